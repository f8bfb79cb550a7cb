//! The common configuration structure (virtio 1.2 §4.1.4.3): register decoding with width and
//! offset checks, feature windows and per-queue registers.
//!
//! Status, MSI-X vector assignments and the config generation live in the shared
//! [`super::interrupt::InterruptState`] because queue workers read or change them; everything
//! else is owned here and only touched under the device lock.

/// Offsets of the fields in the common configuration structure.
pub(crate) mod offset {
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    pub const DEVICE_FEATURE: u64 = 0x04;
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    pub const DRIVER_FEATURE: u64 = 0x0c;
    pub const CONFIG_MSIX_VECTOR: u64 = 0x10;
    pub const NUM_QUEUES: u64 = 0x12;
    pub const DEVICE_STATUS: u64 = 0x14;
    pub const CONFIG_GENERATION: u64 = 0x15;
    pub const QUEUE_SELECT: u64 = 0x16;
    pub const QUEUE_SIZE: u64 = 0x18;
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
    pub const QUEUE_ENABLE: u64 = 0x1c;
    pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
    pub const QUEUE_DESC: u64 = 0x20;
    pub const QUEUE_DRIVER: u64 = 0x28;
    pub const QUEUE_DEVICE: u64 = 0x30;
}

/// Bytes of the structure this transport implements (up to `queue_device`; the optional
/// `queue_notify_data` / `queue_reset` fields belong to features it does not offer).
pub(crate) const COMMON_CONFIG_LEN: u64 = 0x38;

/// Which part of a 64-bit queue address register an access covers (drivers may use one 64-bit
/// access or two 32-bit ones).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Part {
    Full,
    Low,
    High,
}

/// The queue address registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum QueueAddress {
    Desc,
    Driver,
    Device,
}

/// One decoded register access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Field {
    DeviceFeatureSelect,
    DeviceFeature,
    DriverFeatureSelect,
    DriverFeature,
    ConfigMsixVector,
    NumQueues,
    DeviceStatus,
    ConfigGeneration,
    QueueSelect,
    QueueSize,
    QueueMsixVector,
    QueueEnable,
    QueueNotifyOff,
    QueueAddress(QueueAddress, Part),
}

impl Field {
    /// The field an access of `len` bytes at `at` hits, if it matches a field's offset and width
    /// exactly (a 64-bit address may also be accessed as two aligned dwords).
    pub(crate) fn decode(at: u64, len: usize) -> Option<Field> {
        use offset::*;
        let field = match (at, len) {
            (DEVICE_FEATURE_SELECT, 4) => Field::DeviceFeatureSelect,
            (DEVICE_FEATURE, 4) => Field::DeviceFeature,
            (DRIVER_FEATURE_SELECT, 4) => Field::DriverFeatureSelect,
            (DRIVER_FEATURE, 4) => Field::DriverFeature,
            (CONFIG_MSIX_VECTOR, 2) => Field::ConfigMsixVector,
            (NUM_QUEUES, 2) => Field::NumQueues,
            (DEVICE_STATUS, 1) => Field::DeviceStatus,
            (CONFIG_GENERATION, 1) => Field::ConfigGeneration,
            (QUEUE_SELECT, 2) => Field::QueueSelect,
            (QUEUE_SIZE, 2) => Field::QueueSize,
            (QUEUE_MSIX_VECTOR, 2) => Field::QueueMsixVector,
            (QUEUE_ENABLE, 2) => Field::QueueEnable,
            (QUEUE_NOTIFY_OFF, 2) => Field::QueueNotifyOff,
            _ => return Self::decode_address(at, len),
        };
        Some(field)
    }

    fn decode_address(at: u64, len: usize) -> Option<Field> {
        use offset::*;
        let (register, base) = match at {
            QUEUE_DESC..QUEUE_DRIVER => (QueueAddress::Desc, QUEUE_DESC),
            QUEUE_DRIVER..QUEUE_DEVICE => (QueueAddress::Driver, QUEUE_DRIVER),
            QUEUE_DEVICE..COMMON_CONFIG_LEN => (QueueAddress::Device, QUEUE_DEVICE),
            _ => return None,
        };
        let part = match (at - base, len) {
            (0, 8) => Part::Full,
            (0, 4) => Part::Low,
            (4, 4) => Part::High,
            _ => return None,
        };
        Some(Field::QueueAddress(register, part))
    }
}

/// Registers of one queue as the driver programmed them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct QueueRegisters {
    pub max_size: u16,
    pub size: u16,
    pub enabled: bool,
    pub desc: u64,
    pub driver: u64,
    pub device: u64,
}

impl QueueRegisters {
    fn new(max_size: u16) -> Self {
        Self {
            max_size,
            size: max_size,
            enabled: false,
            desc: 0,
            driver: 0,
            device: 0,
        }
    }

    /// A size the queue may be enabled with, no larger than the maximum: a power of two for a
    /// split ring, any non-zero size for a packed one (virtio 1.2 §2.7).
    pub(crate) fn size_is_valid(&self, packed: bool) -> bool {
        let shape_ok = if packed {
            self.size > 0
        } else {
            self.size.is_power_of_two()
        };
        shape_ok && self.size <= self.max_size
    }

    pub(crate) fn address(&self, register: QueueAddress) -> u64 {
        match register {
            QueueAddress::Desc => self.desc,
            QueueAddress::Driver => self.driver,
            QueueAddress::Device => self.device,
        }
    }

    pub(crate) fn set_address(&mut self, register: QueueAddress, part: Part, value: u64) {
        let slot = match register {
            QueueAddress::Desc => &mut self.desc,
            QueueAddress::Driver => &mut self.driver,
            QueueAddress::Device => &mut self.device,
        };
        *slot = match part {
            Part::Full => value,
            Part::Low => (*slot & !0xffff_ffff) | (value & 0xffff_ffff),
            Part::High => (*slot & 0xffff_ffff) | (value << 32),
        };
    }
}

/// Feature windows and queue registers (device-lock state).
#[derive(Debug)]
pub(crate) struct CommonConfig {
    pub offered: u64,
    pub accepted: u64,
    pub device_feature_select: u32,
    pub driver_feature_select: u32,
    pub queue_select: u16,
    pub queues: Vec<QueueRegisters>,
}

impl CommonConfig {
    pub(crate) fn new(offered: u64, max_sizes: &[u16]) -> Self {
        Self {
            offered,
            accepted: 0,
            device_feature_select: 0,
            driver_feature_select: 0,
            queue_select: 0,
            queues: max_sizes.iter().map(|&m| QueueRegisters::new(m)).collect(),
        }
    }

    /// Back to the power-on state (device reset).
    pub(crate) fn reset(&mut self) {
        self.accepted = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.queue_select = 0;
        for queue in &mut self.queues {
            *queue = QueueRegisters::new(queue.max_size);
        }
    }

    /// The 32-bit window of the offered features the driver selected (zero past bit 63).
    pub(crate) fn device_feature_window(&self) -> u32 {
        feature_window(self.offered, self.device_feature_select)
    }

    pub(crate) fn driver_feature_window(&self) -> u32 {
        feature_window(self.accepted, self.driver_feature_select)
    }

    /// Stores a driver feature window; windows past bit 63 are ignored.
    pub(crate) fn set_driver_feature_window(&mut self, value: u32) {
        let shift = match self.driver_feature_select {
            0 => 0,
            1 => 32,
            _ => return,
        };
        let mask = 0xffff_ffffu64 << shift;
        self.accepted = (self.accepted & !mask) | (u64::from(value) << shift);
    }

    pub(crate) fn num_queues(&self) -> u16 {
        // The transport refuses devices with more queues than the notify region holds.
        u16::try_from(self.queues.len()).unwrap_or(u16::MAX)
    }

    /// The registers of the selected queue (`None`: no such queue, reads as zero).
    pub(crate) fn selected(&self) -> Option<&QueueRegisters> {
        self.queues.get(usize::from(self.queue_select))
    }

    pub(crate) fn selected_mut(&mut self) -> Option<&mut QueueRegisters> {
        self.queues.get_mut(usize::from(self.queue_select))
    }
}

fn feature_window(features: u64, select: u32) -> u32 {
    match select {
        0 => features as u32,
        1 => (features >> 32) as u32,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_requires_exact_offset_and_width() {
        assert_eq!(Field::decode(0x14, 1), Some(Field::DeviceStatus));
        assert_eq!(Field::decode(0x14, 2), None);
        assert_eq!(Field::decode(0x13, 1), None);
        assert_eq!(Field::decode(0x04, 2), None);
        assert_eq!(Field::decode(0x38, 2), None);
        assert_eq!(Field::decode(u64::MAX, 8), None);
    }

    #[test]
    fn queue_addresses_accept_qword_or_dword_halves() {
        let desc = QueueAddress::Desc;
        assert_eq!(
            Field::decode(0x20, 8),
            Some(Field::QueueAddress(desc, Part::Full))
        );
        assert_eq!(
            Field::decode(0x2c, 4),
            Some(Field::QueueAddress(QueueAddress::Driver, Part::High))
        );
        assert_eq!(Field::decode(0x24, 8), None);
        assert_eq!(Field::decode(0x22, 4), None);
        assert_eq!(Field::decode(0x30, 2), None);
    }

    #[test]
    fn address_halves_compose() {
        let mut regs = QueueRegisters::new(8);

        regs.set_address(QueueAddress::Device, Part::High, 0x1);
        regs.set_address(QueueAddress::Device, Part::Low, 0x2000);

        assert_eq!(regs.device, 0x1_0000_2000);
        regs.set_address(QueueAddress::Device, Part::Full, 0x40);
        assert_eq!(regs.address(QueueAddress::Device), 0x40);
    }

    #[test]
    fn feature_windows_past_bit_63_are_inert() {
        let mut common = CommonConfig::new(0x1_0000_0003, &[8]);

        common.device_feature_select = 1;
        let high = common.device_feature_window();
        common.device_feature_select = 2;
        let beyond = common.device_feature_window();
        common.driver_feature_select = 7;
        common.set_driver_feature_window(u32::MAX);

        assert_eq!(high, 1);
        assert_eq!(beyond, 0);
        assert_eq!(common.accepted, 0);
    }
}
