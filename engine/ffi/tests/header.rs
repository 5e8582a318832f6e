//! `include/rmig.h` must be what cbindgen makes of this crate now: a stale header fails here.

use std::path::PathBuf;

#[test]
fn checked_in_header_is_current() {
    let crate_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let cfg = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml")).unwrap();
    let mut out = Vec::new();
    cbindgen::Builder::new()
        .with_crate(&crate_dir)
        .with_config(cfg)
        .generate()
        .expect("cbindgen")
        .write(&mut out);
    let path = crate_dir.join("../../include/rmig.h");
    if std::env::var_os("RMIG_WRITE_HEADER").is_some() {
        std::fs::write(&path, &out).unwrap();
    }
    let have = std::fs::read(&path).unwrap_or_default();
    assert!(
        have == out,
        "include/rmig.h is stale: run `make header` and commit the result"
    );
}
