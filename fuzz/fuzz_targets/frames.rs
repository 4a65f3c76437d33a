//! Frames from several simulated connections through decode and a live document; the driver and
//! its invariants are `collab_crdt::fuzzing` (see there for the input format).
#![no_main]

use std::cell::RefCell;
use std::sync::Once;

use libfuzzer_sys::fuzz_target;

thread_local! {
    static LAST_PANIC: RefCell<String> = const { RefCell::new(String::new()) };
}

/// libFuzzer's hook aborts on any panic, even one `Document::apply_update` catches by design
/// (a yrs panic on a malformed update becomes `DocumentError::Poisoned`). This hook only records
/// the message; a panic that escapes the driver is reported and aborts below.
fn quiet_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            LAST_PANIC.with(|p| *p.borrow_mut() = info.to_string());
        }));
    });
}

fuzz_target!(|data: &[u8]| {
    quiet_panics();
    if std::panic::catch_unwind(|| collab_crdt::fuzzing::run(data)).is_err() {
        LAST_PANIC.with(|p| eprintln!("panic escaped the driver: {}", p.borrow()));
        std::process::abort();
    }
});
