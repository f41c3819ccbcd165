use std::process::ExitCode;

/// jemalloc keeps per-connection overhead low and, with its background
/// thread, hands memory back to the system after a burst of connections.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    // Not in the internal helpers (`__isolate`, `__supervise`): entering a
    // new user namespace needs a process with a single thread.
    let helper = std::env::args_os()
        .nth(1)
        .is_some_and(|arg| arg.as_encoded_bytes().starts_with(b"__"));
    if !helper {
        let _ = tikv_jemalloc_ctl::background_thread::write(true);
    }
    sidekey::cli::main()
}
