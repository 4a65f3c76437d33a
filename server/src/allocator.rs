//! The `collab` binary's global allocator, chosen by cargo feature (the library crate sets none,
//! so an embedding application keeps its own).
//!
//! jemalloc (the default): freed pages go back to the system from background threads, without
//! waiting for the next allocation, so an idle server shrinks after a burst of connections or a
//! large document unloads. `dirty_decay_ms:1000` returns unused dirty pages after about a second
//! instead of jemalloc's 10 s; `muzzy_decay_ms:0` skips the lazily-freed stage (MADV_FREE pages
//! still count in RSS until the kernel needs them, which is what the operator sees).
//! `tcache_nslots_small_max:20` caps each thread's cache of freed small objects at 20 per size
//! class (jemalloc's default is up to 200): a thread cache is only trimmed as its thread
//! allocates, so after a burst of 18,000 connections the idle threads' caches held about 7 MB
//! that the background purge cannot reach (`bench/memory.sh`: RSS 60 s after they closed, 2.23x
//! the idle server's with the default, 1.87x with 20). Refills come 20 objects at a time instead
//! of up to 200; callgrind at fanout-50 counted no measurable difference in allocator
//! instructions (+1.5 %, 27 instructions per delivery), where turning the cache off tripled them.

#[cfg(all(feature = "jemalloc", feature = "mimalloc"))]
compile_error!("features `jemalloc` and `mimalloc` both set a global allocator: pick one");

#[cfg(all(feature = "jemalloc", not(target_env = "msvc")))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Read by jemalloc at its first allocation (the `_rjem_` prefix is tikv-jemalloc-sys's).
#[cfg(all(feature = "jemalloc", not(target_env = "msvc")))]
#[allow(non_upper_case_globals)]
#[export_name = "_rjem_malloc_conf"]
pub static malloc_conf: &[u8] =
    b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0,tcache_nslots_small_max:20\0";

#[cfg(all(feature = "mimalloc", not(target_env = "msvc")))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
