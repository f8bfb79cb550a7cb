//! The server takes any `VirtioDevice`, boxed as well as by type.

mod common;

use std::thread;

use common::*;
use sluice_devices::rng::Rng;
use sluice_vhost::iotlb::FEATURE_ACCESS_PLATFORM;
use sluice_vhost::{Server, FEATURE_RING_PACKED, VHOST_USER_F_PROTOCOL_FEATURES};
use sluice_virtio::VirtioDevice;
use vhost::vhost_user::VhostUserFrontend;
use vhost::VhostBackend;

#[test]
fn a_boxed_device_is_served_with_its_own_identity() {
    let socket = temp_path("boxed-rng.sock");
    let device: Box<dyn VirtioDevice> = Box::new(Rng::new());
    let offered = device.device_features();
    let server = Server::bind(&socket, device).expect("bind");
    thread::spawn(move || server.run());

    let mut session = connect(&socket);
    let queues = session.frontend.get_queue_num().expect("GET_QUEUE_NUM");
    let features = session.frontend.get_features().expect("GET_FEATURES");

    assert_eq!(
        features,
        offered
            | VHOST_USER_F_PROTOCOL_FEATURES
            | FEATURE_RING_PACKED
            | FEATURE_ACCESS_PLATFORM
            | LOG_ALL
    );
    assert_eq!(queues, 1);
}
