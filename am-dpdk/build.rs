//! Finds Debian's `libdpdk` (22.11) with pkg-config, generates bindings for an allowlisted
//! part of its API with bindgen and compiles the C shim (`src/sys/shim.c`) for the
//! `static inline` fast-path functions.
//!
//! Without `libdpdk` the crate still builds (cfg `am_dpdk_missing`): every attempt to
//! start DPDK then fails with the install hint, so the rest of the workspace builds and
//! tests on a machine without DPDK and the DPDK tests fail saying what to install.

use std::env;
use std::path::PathBuf;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(am_dpdk_missing)");
    println!("cargo::rerun-if-changed=src/sys/shim.c");
    println!("cargo::rerun-if-changed=src/sys/shim.h");
    println!("cargo::rerun-if-env-changed=PKG_CONFIG_PATH");
    println!("cargo::rerun-if-env-changed=PKG_CONFIG_LIBDIR");
    let lib = match pkg_config::Config::new()
        .atleast_version("22.11")
        .cargo_metadata(false)
        .probe("libdpdk")
    {
        Ok(lib) => lib,
        Err(e) => {
            println!(
                "cargo::warning=libdpdk not found ({}): am-dpdk builds without DPDK; install it with `apt-get install -y libdpdk-dev dpdk-dev pkg-config libclang-dev`",
                e.to_string().lines().next().unwrap_or("")
            );
            println!("cargo::rustc-cfg=am_dpdk_missing");
            return;
        }
    };
    // The full --cflags: include paths, `-include rte_config.h` and -march (the inline
    // functions need the same machine flags DPDK was built with).
    let cflags = std::process::Command::new("pkg-config")
        .args(["--cflags", "libdpdk"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default();
    let flags: Vec<String> = cflags.split_whitespace().map(String::from).collect();

    let mut build = cc::Build::new();
    build.file("src/sys/shim.c").warnings(true).opt_level(3);
    for f in &flags {
        build.flag(f);
    }
    build.compile("am_dpdk_shim");

    // Link the DPDK libraries the binding uses (shared), the ring PMD for
    // `rte_eth_from_rings`, and let EAL find its other drivers in its plugin directory.
    for l in [
        "rte_eal",
        "rte_ethdev",
        "rte_mbuf",
        "rte_mempool",
        "rte_ring",
        "rte_net_ring",
        "rte_bus_vdev",
        "rte_kvargs",
    ] {
        println!("cargo::rustc-link-lib=dylib={l}");
    }
    for p in &lib.link_paths {
        println!("cargo::rustc-link-search=native={}", p.display());
    }

    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    let b = bindgen::Builder::default()
        .header("src/sys/shim.h")
        .clang_args(flags.iter().filter(|f| !f.starts_with("-march")))
        .allowlist_function("rte_eal_init")
        .allowlist_function("rte_strerror")
        .allowlist_function("rte_socket_id")
        .allowlist_function("rte_get_tsc_hz")
        .allowlist_function("rte_pktmbuf_pool_create")
        .allowlist_function("rte_eth_dev_configure")
        .allowlist_function("rte_eth_rx_queue_setup")
        .allowlist_function("rte_eth_tx_queue_setup")
        .allowlist_function("rte_eth_dev_start")
        .allowlist_function("rte_eth_dev_stop")
        .allowlist_function("rte_eth_dev_info_get")
        .allowlist_function("rte_eth_macaddr_get")
        .allowlist_function("rte_eth_dev_get_port_by_name")
        .allowlist_function("rte_eth_dev_get_name_by_port")
        .allowlist_function("rte_eth_promiscuous_enable")
        .allowlist_function("rte_eth_link_get_nowait")
        .allowlist_function("rte_eth_dev_rx_intr_ctl_q_get_fd")
        .allowlist_function("rte_eth_dev_rx_intr_enable")
        .allowlist_function("rte_eth_dev_rx_intr_disable")
        .allowlist_function("rte_eth_dev_rx_intr_ctl_q")
        .allowlist_function("rte_epoll_wait")
        .allowlist_function("rte_epoll_ctl")
        .allowlist_type("rte_epoll_event")
        .allowlist_function("rte_eth_from_rings")
        .allowlist_function("rte_ring_create")
        .allowlist_function("rte_vdev_init")
        .allowlist_function("am_shim_.*")
        .allowlist_type("rte_eth_conf")
        .allowlist_type("rte_eth_dev_info")
        .allowlist_type("rte_eth_link")
        .opaque_type("rte_mbuf")
        .opaque_type("rte_mempool")
        .opaque_type("rte_ring")
        .derive_default(true)
        .layout_tests(false)
        .generate_comments(false);
    b.generate()
        .expect("bindgen on DPDK 22.11's headers (needs libclang-dev)")
        .write_to_file(out.join("dpdk.rs"))
        .expect("write bindings");
}
