"""llama.cpp as the peer of benchmarks/peer_llamacpp.py, fetched and built at run time into a
cache directory outside the repository (never committed):

- fetch: the llama-cpp-python sdist from PyPI (it vendors llama.cpp), unpacked; cmake build
  of `llama-bench` once;
- convert: our synthetic checkpoint (the very weights jaxmoe runs) to GGUF with the sdist's
  convert_hf_to_gguf.py, after the config fix-ups llama.cpp needs;
- bench: llama-bench command lines and its `-o json` output.
"""
