"""Runtimes users deploy with, driven by qaft to prove its exports: ``llamacpp`` (llama.cpp itself, through the
prebuilt binaries of the pinned npm package ``node-llama-cpp``). Not Python packages of their own: each folder
holds the runtime's lockfile and script, installed by ``make setup`` beside them."""
