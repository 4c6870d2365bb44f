"""Weight quantizers (one file each) behind one interface."""
