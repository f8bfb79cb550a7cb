pub fn nvme_placeholder() {}
