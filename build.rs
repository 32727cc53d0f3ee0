//! Records when the binary was built, as `EDGE_REPLICATOR_BUILD_EPOCH`
//! (seconds since the Unix epoch): `SOURCE_DATE_EPOCH` when the build sets
//! it (reproducible builds, Debian packaging), else the build machine's
//! clock. The agent takes any earlier time as a clock that is certainly
//! wrong (src/clock.rs).

use std::time::{SystemTime, UNIX_EPOCH};

fn main() {
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");
    println!("cargo:rerun-if-changed=build.rs");
    let epoch = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        });
    println!("cargo:rustc-env=EDGE_REPLICATOR_BUILD_EPOCH={epoch}");
}
