# cpu_ext.mk -- native targets of the CPU expert engine; included by the top-level Makefile.
#   make native    build jaxmoe/cpu/_native/libjaxmoe_cpu.so (pip install -e . does it too)
#   make sanitize  build the C harness under ASan + UBSan and run it; with CPU_EXT_EMU512=1
#                  also the harness with the AVX-512 path emulated through SIMDe (slow to
#                  compile; the Python tests run that path anyway where SIMDe is installed)
# $(PY) is the project's interpreter (the top-level Makefile's venv); builder: cpu_ext/build.py.

PY ?= python3
CPU_EXT_BUILD := build/cpu_ext
CPU_EXT_SAN_ENV := ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1

.PHONY: native sanitize

native: $(VENV_STAMP)
	$(PY) cpu_ext/build.py

sanitize: $(VENV_STAMP)
	$(PY) cpu_ext/build.py --harness $(CPU_EXT_BUILD)/test_native_asan --sanitize
	$(CPU_EXT_SAN_ENV) $(CPU_EXT_BUILD)/test_native_asan
	@if [ -n "$(CPU_EXT_EMU512)" ]; then \
	  echo "$(PY) cpu_ext/build.py --harness $(CPU_EXT_BUILD)/test_native_emu512_asan --variant emu512 --sanitize"; \
	  $(PY) cpu_ext/build.py --harness $(CPU_EXT_BUILD)/test_native_emu512_asan --variant emu512 --sanitize && \
	  $(CPU_EXT_SAN_ENV) $(CPU_EXT_BUILD)/test_native_emu512_asan; \
	fi
