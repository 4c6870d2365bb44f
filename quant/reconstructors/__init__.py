"""Low-rank error reconstruction methods (one file each) behind one interface."""
