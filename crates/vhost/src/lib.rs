//! vhost-user backend for sluice's virtio device models.
