# Building and installing librmig (the C ABI). `make install PREFIX=/usr/local` installs the
# libraries, include/rmig.h and a pkg-config file rmig.pc.
PREFIX ?= /usr/local
LIBDIR ?= $(PREFIX)/lib
INCLUDEDIR ?= $(PREFIX)/include
VERSION := 0.1.0

.PHONY: all lib header install uninstall
all: lib

lib:
	cargo build --release -p rmig-ffi

# Regenerates include/rmig.h from engine/ffi with cbindgen.
header:
	RMIG_WRITE_HEADER=1 cargo test --release -p rmig-ffi --test header -q

install: lib
	install -d $(DESTDIR)$(LIBDIR)/pkgconfig $(DESTDIR)$(INCLUDEDIR)
	install -m 0644 target/release/librmig.a $(DESTDIR)$(LIBDIR)/librmig.a
	install -m 0755 target/release/librmig.so $(DESTDIR)$(LIBDIR)/librmig.so
	install -m 0644 include/rmig.h $(DESTDIR)$(INCLUDEDIR)/rmig.h
	sed -e 's|@PREFIX@|$(PREFIX)|' -e 's|@LIBDIR@|$(LIBDIR)|' -e 's|@INCLUDEDIR@|$(INCLUDEDIR)|' \
	    -e 's|@VERSION@|$(VERSION)|' engine/ffi/rmig.pc.in > $(DESTDIR)$(LIBDIR)/pkgconfig/rmig.pc

uninstall:
	rm -f $(DESTDIR)$(LIBDIR)/librmig.a $(DESTDIR)$(LIBDIR)/librmig.so \
	      $(DESTDIR)$(INCLUDEDIR)/rmig.h $(DESTDIR)$(LIBDIR)/pkgconfig/rmig.pc
