//! The vhost-user backend's message handling (`sluice serve blk`) fed a raw frontend byte
//! stream; the body and what it checks: `sluice_vhost::fuzz`. One server (over a 1 MiB image)
//! serves every input, as `sluice serve` serves one connection after another.

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use sluice_devices::block::{Block, BlockConfig};
use sluice_vhost::fuzz::vhost_user_messages;
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
    vhost_user_messages(data, |stream| {
        server().serve_connection(stream);
    });
});
