//! The vhost-user backend's message handling (`sluice serve blk`), fed a raw byte stream as if
//! from a frontend: malformed, truncated and out-of-order messages, and messages whose file
//! descriptors are missing (a byte stream cannot carry SCM_RIGHTS). The server must end the
//! connection cleanly (closed or dropped with an error) — never panic, never hang.

#![no_main]

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use sluice_devices::block::{Block, BlockConfig};
use sluice_vhost::server::Server;

fn server() -> &'static Server<Block> {
    static SERVER: OnceLock<Server<Block>> = OnceLock::new();
    SERVER.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("sluice-fuzz-vhost-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let image = dir.join("disk.img");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let block = Block::new(BlockConfig::new(&image)).unwrap();
        Server::bind(&dir.join("vhost.sock"), block).unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    let (mut frontend, backend) = UnixStream::pair().unwrap();
    // The socket buffer holds far more than libFuzzer's default input size, so this never blocks.
    if frontend.write_all(data).is_err() {
        return;
    }
    // EOF after the input; replies stay unread in our receive buffer (no SIGPIPE).
    frontend.shutdown(std::net::Shutdown::Write).unwrap();
    let _ = server().serve_connection(backend);
});
