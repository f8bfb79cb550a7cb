//! `cargo test` replays the committed corpora of the fuzz targets whose bodies live in this
//! crate (see fuzz/corpus_replay.rs for the mechanism and how to add a target).

mod common;
#[path = "../../../fuzz/corpus_replay.rs"]
mod corpus_replay;

use sluice_devices::block::{Block, BlockConfig};
use sluice_vhost::fuzz::vhost_user_messages;
use sluice_vhost::server::Server;

#[test]
fn fuzz_corpora_replay_without_panics() {
    let image = common::make_image("fuzz-corpus");
    let block = Block::new(BlockConfig::new(&image)).expect("open the image");
    let socket = common::temp_path("fuzz-corpus.sock");
    let server = Server::bind(&socket, block).expect("bind");
    let serve = |data: &[u8]| {
        vhost_user_messages(data, |stream| {
            server.serve_connection(stream);
        })
    };

    corpus_replay::replay_owned(env!("CARGO_PKG_NAME"), &[("vhost_user_messages", &serve)]);

    drop(server);
    let _ = std::fs::remove_file(&socket);
    let _ = std::fs::remove_file(&image);
}
