//! Writes the test guest's initramfs (see `e2e::write_test_initramfs`).
//! Usage: test-initramfs OUT

fn main() {
    let Some(out) = std::env::args_os().nth(1) else {
        eprintln!("usage: test-initramfs OUT");
        std::process::exit(2);
    };
    if let Err(e) = e2e::write_test_initramfs(std::path::Path::new(&out)) {
        eprintln!("test-initramfs: {e}");
        std::process::exit(1);
    }
}
