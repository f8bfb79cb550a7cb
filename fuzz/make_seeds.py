#!/usr/bin/env python3
"""Writes the committed seed corpora under corpus/<target>/ (deterministic; rerun after
changing an input format). Each seed is a small, well-formed input that reaches deep into
its parser, so the campaigns start past the trivial rejections."""

import pathlib
import struct

ROOT = pathlib.Path(__file__).resolve().parent / "corpus"

# --- blk_request: guest memory image (descriptor table 0x0, avail ring 0x100) ---------------
NEXT, WRITE, INDIRECT = 1, 2, 4
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13


def desc(addr, length, flags, nxt=0):
    return struct.pack("<QIHH", addr, length, flags, nxt)


def chain(*descs):
    """A descriptor list linked 0 -> 1 -> ... (NEXT set on all but the last)."""
    out = b""
    for i, (addr, length, flags) in enumerate(descs):
        last = i == len(descs) - 1
        out += desc(addr, length, flags | (0 if last else NEXT), 0 if last else i + 1)
    return out


def memory(table, fills, size):
    image = bytearray(size)
    image[: len(table)] = table
    struct.pack_into("<HHH", image, 0x100, 0, 1, 0)  # avail: flags, idx 1, ring[0] = head 0
    for at, data in fills:
        image[at : at + len(data)] = data
    return bytes(image)


def header(kind, sector=0):
    return struct.pack("<IIQ", kind, 0, sector)


def segment(sector, count, flags):
    return struct.pack("<QII", sector, count, flags)


def blk_seeds():
    hdr, data, status = 0x300, 0x400, 0x800
    yield "in_read", memory(
        chain((hdr, 16, 0), (data, 512, WRITE), (status, 1, WRITE)),
        [(hdr, header(T_IN, 3))], status + 1)
    yield "in_read_three_buffers", memory(
        chain((hdr, 16, 0), (data, 512, WRITE), (data + 0x200, 0x200, WRITE),
              (data + 0x400, 0x1ff, WRITE), (status + 0x1ff, 1 + 1, WRITE)),
        [(hdr, header(T_IN, 2040))], status + 0x201)
    yield "out_write", memory(
        chain((hdr, 16, 0), (data, 1024, 0), (status, 1, WRITE)),
        [(hdr, header(T_OUT, 7)), (data, bytes(range(256)) * 4)], status + 1)
    yield "out_write_header_and_data_in_one", memory(
        chain((hdr, 16 + 512, 0), (status, 1, WRITE)),
        [(hdr, header(T_OUT, 0))], status + 1)
    # desc 0's address 0x301 makes the first input byte 1: a read-only disk.
    yield "out_write_read_only", memory(
        chain((hdr + 1, 16, 0), (data, 512, 0), (status, 1, WRITE)),
        [(hdr + 1, header(T_OUT, 1))], status + 1)
    yield "flush", memory(
        chain((hdr, 16, 0), (status, 1, WRITE)), [(hdr, header(T_FLUSH))], status + 1)
    yield "get_id", memory(
        chain((hdr, 16, 0), (data, 20, WRITE), (status, 1, WRITE)),
        [(hdr, header(T_GET_ID))], status + 1)
    yield "discard_two_segments", memory(
        chain((hdr, 16, 0), (hdr + 0x20, 32, 0), (status, 1, WRITE)),
        [(hdr, header(T_DISCARD)),
         (hdr + 0x20, segment(8, 8, 0) + segment(100, 900, 0))], status + 1)
    yield "write_zeroes_unmap", memory(
        chain((hdr, 16 + 16, 0), (status, 1, WRITE)),
        [(hdr, header(T_WRITE_ZEROES) + segment(2000, 48, 1))], status + 1)
    indirect = 0x380
    yield "in_read_indirect", memory(
        desc(indirect, 48, INDIRECT),
        [(indirect, chain((hdr, 16, 0), (data, 1024, WRITE), (status, 1, WRITE))),
         (hdr, header(T_IN, 1))], status + 1)


# --- net_header: virtio_net_hdr_v1 + Ethernet frame -------------------------------------------
def net_hdr(flags=0, gso_type=0, hdr_len=0, gso_size=0, csum_start=0, csum_offset=0):
    return struct.pack("<BBHHHHH", flags, gso_type, hdr_len, gso_size, csum_start,
                       csum_offset, 0)


ETH_V4 = bytes(6) + bytes([2, 0, 0, 0, 0, 1]) + b"\x08\x00"
ETH_V6 = bytes(6) + bytes([2, 0, 0, 0, 0, 1]) + b"\x86\xdd"
IPV4_TCP = bytes([0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2])
IPV6_TCP = bytes([0x60, 0, 0, 0, 0, 20, 6, 64]) + bytes(15) + b"\x01" + bytes(15) + b"\x02"
TCP = struct.pack(">HHIIBBHHH", 1234, 80, 1, 0, 0x50, 0x18, 65535, 0, 0)


def net_seeds():
    v4 = ETH_V4 + IPV4_TCP + TCP + b"payload!" * 8
    v6 = ETH_V6 + IPV6_TCP + TCP + b"payload!" * 8
    yield "plain_ipv4", net_hdr() + v4
    yield "csum_ipv4_tcp", net_hdr(1, 0, 0, 0, 34, 16) + v4
    yield "tso4", net_hdr(1, 1, 54, 1448, 34, 16) + v4
    yield "tso6", net_hdr(1, 4, 74, 1428, 54, 16) + v6
    # Leading selector byte: the second check sees the rest with only CSUM + TSO4.
    yield "selector_csum_tso4", bytes([3]) + net_hdr(1, 1, 54, 1448, 34, 16) + v4
    yield "selector_none_plain", bytes([0]) + net_hdr() + v4


# --- virtio_pci_registers: op script (format in crates/virtio/src/pci/fuzz.rs) ----------------
COMMON, ISR, DEVCFG, NOTIFY, MSIX_TABLE, MSIX_PBA, CONFIG = range(7)
WIDTH_LOG2 = {1: 0, 2: 1, 4: 2, 8: 3}
(FEAT_SEL, FEAT, DRV_FEAT_SEL, DRV_FEAT, CFG_VEC, NUM_QUEUES, STATUS, GENERATION, Q_SELECT,
 Q_SIZE, Q_VECTOR, Q_ENABLE, Q_NOTIFY_OFF, Q_DESC, Q_DRIVER, Q_DEVICE) = (
    0x00, 0x04, 0x08, 0x0c, 0x10, 0x12, 0x14, 0x15, 0x16, 0x18, 0x1a, 0x1c, 0x1e, 0x20, 0x28,
    0x30)
ACK, DRIVER, DRIVER_OK, FEATURES_OK = 1, 2, 4, 8
# Config space layout of this transport: 4 virtio caps, the PCI cfg access cap, then MSI-X.
PCI_CFG_CAP, MSIX_CAP = 0x84, 0x98


def op(target, offset, width, value=None, focused=False):
    code = target | WIDTH_LOG2[width] << 3 | (0x40 if focused else 0)
    if value is None:
        return struct.pack("<BH", code, offset)
    return struct.pack("<BH", code | 0x20, offset) + value.to_bytes(width, "little")


def common(offset, width, value=None):
    return op(COMMON, offset, width, value, focused=True)


def setup_queue(index, base):
    return (common(Q_SELECT, 2, index) + common(Q_SIZE, 2) + common(Q_SIZE, 2, 8)
            + common(Q_DESC, 8, base) + common(Q_DRIVER, 4, base + 0x100)
            + common(Q_DRIVER + 4, 4, 0) + common(Q_DEVICE, 8, base + 0x200)
            + common(Q_VECTOR, 2, index + 1) + common(Q_VECTOR, 2) + common(Q_ENABLE, 2, 1))


def negotiate():
    return (common(STATUS, 1, 0) + common(STATUS, 1, ACK) + common(STATUS, 1, ACK | DRIVER)
            + common(FEAT_SEL, 4, 0) + common(FEAT, 4) + common(FEAT_SEL, 4, 1)
            + common(FEAT, 4) + common(DRV_FEAT_SEL, 4, 0) + common(DRV_FEAT, 4, 1 << 29)
            + common(DRV_FEAT_SEL, 4, 1) + common(DRV_FEAT, 4, 1)
            + common(STATUS, 1, ACK | DRIVER | FEATURES_OK) + common(STATUS, 1)
            + common(NUM_QUEUES, 2))


def pci_seeds():
    driver_ok = common(STATUS, 1, ACK | DRIVER | FEATURES_OK | DRIVER_OK)
    msix_enable = op(CONFIG, MSIX_CAP + 2, 2, 0x8000)
    msix_entry = (op(MSIX_TABLE, 0x10, 4, 0xfee00000) + op(MSIX_TABLE, 0x14, 4, 0)
                  + op(MSIX_TABLE, 0x18, 4, 0x41) + op(MSIX_TABLE, 0x1c, 4, 0))
    yield "activate_two_queues", (
        negotiate() + setup_queue(0, 0x1000) + setup_queue(1, 0x4000) + driver_ok
        + op(NOTIFY, 0, 2, 0) + op(NOTIFY, 4, 2, 1) + op(ISR, 0, 1) + common(GENERATION, 1))
    yield "msix_vectors_and_kick", (
        msix_enable + msix_entry + op(MSIX_TABLE, 0x0c, 4, 1) + op(MSIX_TABLE, 0, 8, 0xfee00000)
        + negotiate() + common(CFG_VEC, 2, 0) + common(CFG_VEC, 2) + setup_queue(0, 0x2000)
        + driver_ok + op(NOTIFY, 0, 2, 0) + op(MSIX_PBA, 0, 8) + op(DEVCFG, 0, 4, 0xdeadbeef)
        + op(DEVCFG, 0, 4) + op(DEVCFG, 12, 4) + op(MSIX_TABLE, 0x0c, 4, 0))
    yield "reset_after_driver_ok", (
        negotiate() + setup_queue(0, 0x1000) + driver_ok + common(STATUS, 1, 0)
        + common(STATUS, 1) + common(Q_ENABLE, 2) + common(Q_NOTIFY_OFF, 2))
    yield "pci_cfg_access_window", (
        op(CONFIG, PCI_CFG_CAP + 4, 1, 0) + op(CONFIG, PCI_CFG_CAP + 8, 4, STATUS)
        + op(CONFIG, PCI_CFG_CAP + 12, 4, 1) + op(CONFIG, PCI_CFG_CAP + 16, 4)
        + op(CONFIG, PCI_CFG_CAP + 16, 1, ACK) + op(CONFIG, PCI_CFG_CAP + 8, 4, FEAT)
        + op(CONFIG, PCI_CFG_CAP + 12, 4, 4) + op(CONFIG, PCI_CFG_CAP + 16, 4))
    yield "config_space_walk", b"".join(op(CONFIG, offset, 4) for offset in range(0, 0x100, 4))
    yield "bar_writes", (op(CONFIG, 0x04, 2, 0x0006) + op(CONFIG, 0x10, 4, 0xffffffff)
                         + op(CONFIG, 0x10, 4) + op(7, 0x1000, 1) + op(7, 0x7ffe, 2, 1))


# --- vhost_user_fds: frontend scripts (op format in crates/vhost/src/fuzz.rs) --------------
USER_BASE = 0x7f00_0000_0000  # where the script's regions sit in "frontend" addresses
HANDSHAKE_ALL = bytes([0, 7])  # PROTOCOL_FEATURES, EVENT_IDX, every offered protocol feature
MEM_16_PAGES = bytes([1, 0, 15])  # SET_MEM_TABLE: one memfd of 16 pages at slot 0
RING_16 = bytes([6, 0, 4, 0])  # queue 0: 16 entries, base 0, rings at 0 / 0x1000 / 0x2000
KICK_FD, CALL_FD, ENABLE, KICK = bytes([7, 0]), bytes([8, 0]), bytes([10, 0, 1]), bytes([11, 0])


def write_memfd(index, offset, data):
    assert offset % 64 == 0 and len(data) < 64
    return bytes([12, index, offset // 64, len(data)]) + data


def one_request(memfd):
    """A one-descriptor writable chain at head 0, published in the avail ring."""
    return (write_memfd(memfd, 0, desc(0x4000, 64, WRITE))
            + write_memfd(memfd, 0x1000, struct.pack("<HHH", 0, 1, 0)))


def fds_seeds():
    ring = RING_16 + KICK_FD + CALL_FD + ENABLE
    yield "ring_io", HANDSHAKE_ALL + MEM_16_PAGES + ring + one_request(0) + KICK
    yield "shrink_ram", (HANDSHAKE_ALL + MEM_16_PAGES + ring + one_request(0)
                         + bytes([13, 0, 1]) + KICK)
    yield "shrink_inflight", (HANDSHAKE_ALL + bytes([4, 5, 0, 4]) + bytes([1, 0, 15]) + ring
                              + one_request(1) + bytes([13, 0, 0]) + KICK)
    yield "saturated_call", (HANDSHAKE_ALL + MEM_16_PAGES + RING_16 + KICK_FD + bytes([8, 0x80])
                             + ENABLE + one_request(0) + KICK + bytes([14, 0]))
    yield "remove_and_add_back", (HANDSHAKE_ALL + bytes([2, 0, 15]) + ring + bytes([3, 0, 15])
                                  + bytes([2, 0x80, 0]) + one_request(0) + KICK)
    yield "add_again_from_another_fd", (HANDSHAKE_ALL + bytes([2, 0, 15]) + ring
                                        + bytes([2, 0, 15]) + one_request(1) + KICK)
    yield "kick_before_addr_no_protocol", (bytes([0, 0]) + MEM_16_PAGES + KICK_FD + CALL_FD
                                           + RING_16 + one_request(0) + KICK)
    # Packed rings (handshake bit 3) with a packed inflight area (GET_INFLIGHT_FD after the
    # features), base in the packed form (ring setup bit 6): one writable descriptor at slot 0,
    # then GET_VRING_BASE.
    packed_ring = bytes([6, 0x40, 3, 0]) + KICK_FD + CALL_FD + ENABLE
    yield "packed_ring_io", (bytes([0, 0x0F]) + bytes([5, 0, 3]) + MEM_16_PAGES + packed_ring
                             + write_memfd(0, 0, packed_desc(0x3000, 16, 0, P_AVAIL | WRITE))
                             + KICK + bytes([14, 0]))
    # A packed inflight area the frontend filled in itself (SET_INFLIGHT_FD, then rewritten):
    # an uncommitted used step, a chain with a bad `last` (dropped) and a valid one-descriptor
    # chain (resubmitted and served at the area's used position).
    header = struct.pack("<QHHHHHHBB", 0, 1, 8, 3, 0xFF, 5, 2, 1, 0)
    bad_chain = struct.pack("<BBHHHQ", 1, 0, 7, 9, 3, 4)
    good_chain = struct.pack("<BBHHHQHHIQ", 1, 0, 2, 1, 1, 5, 0, P_AVAIL | WRITE, 16, 0x3000)
    area = header.ljust(32, b"\0") + bad_chain
    yield "packed_inflight_recovery", (bytes([0, 0x0F]) + bytes([4, 5, 0, 3])
                                       + write_memfd(0, 0, area[:63])
                                       + write_memfd(0, 64, good_chain)
                                       + bytes([1, 0, 15]) + packed_ring + KICK)
    # Behind a vIOMMU (handshake bits 4 and 5: ACCESS_PLATFORM, a backend channel): the ring
    # IOVAs are the user addresses the ring setup sends, mapped by IOTLB updates (op 15,
    # request 22) onto the region; the request's buffer IOVA 0x4000 is mapped too.
    def iotlb_update(iova, size, uaddr):
        body = struct.pack("<QQQBB6x", iova, size, uaddr, 3, 2)
        return bytes([15, 22, 1 | 8, len(body), 0]) + body
    # Dirty logging (handshake bit 6: VHOST_F_LOG_ALL; op 14 with bit 7: SET_LOG_BASE of
    # `(p0 & 0x3f) * 8` bytes, one page into its file with bit 6): a ring served into a log,
    # then logs the backend must refuse — empty, past the end of its file, too small for a
    # region at 3 MiB.
    yield "dirty_log_ring_io", (bytes([0, 0x47]) + MEM_16_PAGES + bytes([14, 0x82]) + ring
                                + one_request(0) + KICK)
    yield "dirty_log_empty", bytes([0, 0x47]) + MEM_16_PAGES + bytes([14, 0x80])
    yield "dirty_log_past_end", bytes([0, 0x47]) + MEM_16_PAGES + bytes([14, 0xC2])
    yield "dirty_log_too_small", bytes([0, 0x47]) + bytes([2, 3, 15]) + bytes([14, 0x81])
    yield "iotlb_ring_io", (bytes([0, 0x37]) + MEM_16_PAGES
                            + iotlb_update(USER_BASE, 0x3000, USER_BASE)
                            + iotlb_update(0x4000, 0x1000, USER_BASE + 0x4000)
                            + ring + one_request(0) + KICK)


# --- vhost_user_backend_replies: backend scripts (format in
# crates/devices/src/vhost_user_blk/fuzz.rs): a setup byte, then one action per request -------
HEALTHY, VALUE, BODY, RAW_HEADER, GARBAGE, SILENT, HANG_UP, TWICE = range(8)
THEN_HANG_UP = 0x80
HANDSHAKE = 7  # GET_FEATURES ... GET_CONFIG, with every protocol feature sluice uses
SETUP = 10  # GET/SET_INFLIGHT_FD, SET_FEATURES, ADD_MEM_REG, 5 ring requests, SET_VRING_ENABLE
RESET = 2  # GET_VRING_BASE, RESET_DEVICE


def value(v):
    return bytes([VALUE]) + struct.pack("<Q", v)


def body(data, action=BODY):
    return bytes([action, len(data)]) + data


def blk_config(capacity, num_queues):
    """virtio_blk_config (60 bytes) as qemu-storage-daemon fills it for a 512-byte-block disk."""
    return (struct.pack("<QIIHBBI", capacity, 0, 126, 0, 0, 0, 512)  # ..., geometry, blk_size
            + struct.pack("<BBHI", 0, 0, 1, 1)  # topology
            + struct.pack("<BBH", 1, 0, num_queues)  # wce, unused, num_queues
            + struct.pack("<IIIIIB3x", 32768, 1, 1, 32768, 1, 1))  # discard / write zeroes


# qemu-storage-daemon 7.2's vhost-user-blk export (libvhost-user): SEG_MAX, BLK_SIZE, FLUSH,
# TOPOLOGY, CONFIG_WCE, MQ, DISCARD, WRITE_ZEROES, NOTIFY_ON_EMPTY, LOG_ALL, INDIRECT_DESC,
# EVENT_IDX, PROTOCOL_FEATURES, VERSION_1; protocol MQ, LOG_SHMFD, REPLY_ACK, BACKEND_REQ,
# CONFIG, BACKEND_SEND_FD, HOST_NOTIFIER, CONFIGURE_MEM_SLOTS.
QSD_FEATURES = sum(1 << b for b in (1, 2, 6, 9, 10, 11, 12, 13, 14, 24, 26, 28, 29, 30, 32))
QSD_PROTOCOL = 0x8e2b


def backend_seeds():
    healthy = bytes(HANDSHAKE + SETUP + RESET)
    yield "empty", b""  # no actions: the first request ends the script
    yield "healthy", bytes([0]) + healthy
    yield "healthy_two_queues_second_active", bytes([3]) + healthy
    # Setup bit 3: a migration's steps after the setup — SET_LOG_BASE (answered with a u64, as
    # libvhost-user does), SET_FEATURES with LOG_ALL, SET_VRING_ADDR with the log flag, then
    # GET_VRING_BASE (the quiesce); logging off sends nothing once the rings are quiesced.
    yield "migration_logging", bytes([8]) + bytes(HANDSHAKE + SETUP + 3 + 1)
    # SET_LOG_BASE answered with 40 bytes: no log (the connection is dropped), no panic.
    yield "migration_log_reply_too_long", (bytes([8]) + bytes(HANDSHAKE + SETUP)
                                           + body(bytes(40)))
    # No INFLIGHT_SHMFD or RESET_DEVICE: the setup is 8 requests, the reset GET_VRING_BASE only.
    yield "qsd_handshake", (bytes([0]) + value(QSD_FEATURES) + value(QSD_PROTOCOL)
                            + bytes([HEALTHY]) + value(1) + value(32) + bytes([HEALTHY])
                            + body(struct.pack("<III", 0, 60, 0) + blk_config(2048, 1))
                            + bytes(8 + 1))
    # GET_CONFIG answered with 28 of the 60 config bytes, then a hang-up.
    yield "truncated_get_config", (bytes([0]) + bytes(HANDSHAKE - 1)
                                   + body(struct.pack("<III", 0, 60, 0) + bytes(28),
                                          BODY | THEN_HANG_UP))
    # The backend refuses SET_FEATURES (REPLY_ACK 1): the device needs a reset, the connection
    # stays, and the reset still stops the ring.
    yield "nack_at_driver_ok", (bytes([0]) + bytes(HANDSHAKE + 2) + value(1) + bytes(SETUP - 3)
                                + bytes(RESET))
    yield "nack_set_owner", bytes([0]) + bytes(5) + value(1)
    yield "close_mid_handshake", bytes([0, HEALTHY, HEALTHY, HANG_UP])
    # Healthy handshake, then a hang-up: the activation reconnects and sets up the second one.
    yield "reconnect_at_driver_ok", (bytes([0]) + bytes(HANDSHAKE - 1) + bytes([THEN_HANG_UP])
                                     + bytes(HANDSHAKE + SETUP + RESET))
    # GET_INFLIGHT_FD answered without its fd.
    yield "inflight_without_fd", (bytes([0]) + bytes(HANDSHAKE)
                                  + body(struct.pack("<QQHH4x", 4096, 0, 1, 16)) + bytes(RESET))
    # A header's and a u64's worth of garbage for GET_FEATURES: refused at once.
    yield "garbage_reply", bytes([0]) + bytes([GARBAGE, 20]) + b"\xa5" * 20
    # SET_OWNER acked twice: the stale ack comes back as GET_CONFIG's answer.
    yield "stale_ack", bytes([0]) + bytes(5) + bytes([TWICE, HEALTHY])
    # GET_VRING_BASE never answered: the reset gives up after one timeout.
    yield "stall_at_reset", bytes([0]) + bytes(HANDSHAKE + SETUP) + bytes([SILENT, HEALTHY])
    # Behind a vIOMMU (setup bit 2): the handshake adds SET_BACKEND_REQ_FD. With SET_VRING_ENABLE
    # the backend puts three MISSes on its channel (GARBAGE goes to the channel then): a
    # read-only page, a read-write page asked for writing, and an IOVA beyond guest RAM (a
    # fault: no UPDATE). Two UPDATEs come back on the main socket, each acked, then the reset.
    misses = (backend_miss(0x3000, IOTLB_RO) + backend_miss(0x2800, IOTLB_WO)
              + backend_miss(1 << 20, IOTLB_RO))
    yield "iommu_misses", (bytes([IOMMU]) + bytes(HANDSHAKE + 1 + SETUP - 1)
                           + bytes([GARBAGE, len(misses)]) + misses + bytes(1 + 2 + RESET))
    # A channel message with a bad version: the channel is given up, the device keeps running.
    yield "iommu_channel_garbage", (bytes([IOMMU]) + bytes(HANDSHAKE + 1 + SETUP - 1)
                                    + bytes([GARBAGE, 12]) + b"\x01\x00\x00\x00" * 3
                                    + bytes(1 + RESET))
    # A backend without ACCESS_PLATFORM is refused behind a vIOMMU.
    yield "iommu_without_access_platform", (bytes([IOMMU]) + value(QSD_FEATURES)
                                            + value(QSD_PROTOCOL))


IOMMU = 4
IOTLB_RO, IOTLB_WO = 1, 2


def backend_miss(iova, perm):
    """An IOTLB MISS on the backend request channel (request 1, version 1, 32-byte body)."""
    return struct.pack("<III", 1, 1, 32) + struct.pack("<QQQBB6x", iova, 0, 0, perm, 1)


# --- packed_ring: [size - 1, mode, guest memory (ring at 0x0, driver event at 0x2000)] -------
P_AVAIL, P_USED = 1 << 7, 1 << 15


def packed_desc(addr, length, buffer_id, flags):
    return struct.pack("<QIHH", addr, length, buffer_id, flags)


def packed_input(size, mode, ring, fills=(), driver_event=None):
    image = bytearray(0x5000)
    image[: len(ring)] = ring
    if driver_event is not None:
        struct.pack_into("<HH", image, 0x2000, *driver_event)
    for at, data in fills:
        image[at : at + len(data)] = data
    return bytes([size - 1, mode]) + bytes(image)


def packed_seeds():
    yield "read_then_write", packed_input(8, 0, packed_desc(0x3000, 16, 0, P_AVAIL | NEXT)
                                          + packed_desc(0x3100, 64, 0, P_AVAIL | WRITE),
                                          [(0x3000, b"sixteen bytes..!")])
    table = (packed_desc(0x3000, 16, 0, 0) + packed_desc(0x3100, 512, 0, WRITE)
             + packed_desc(0x3400, 1, 0, WRITE))
    yield "indirect_event_idx", packed_input(4, 1, packed_desc(0x4000, 48, 2, P_AVAIL | INDIRECT),
                                             [(0x4000, table)])
    ring = b"".join(packed_desc(0x3000 + 0x100 * i, 32, i // 2, P_AVAIL | (NEXT if i % 2 == 0 else WRITE))
                    for i in range(8))
    yield "full_ring_batched_event_desc", packed_input(8, 3, ring, driver_event=(P_USED | 3, 2))
    yield "chain_round_the_ring", packed_input(
        4, 0, b"".join(packed_desc(0x3000, 8, 0, P_AVAIL | NEXT) for _ in range(4)))
    yield "same_id_twice", packed_input(4, 2, packed_desc(0x3000, 8, 1, P_AVAIL | WRITE) * 2)


# ---- e1000 (crates/devices/src/e1000/fuzz.rs) -------------------------------------------------

E1000_EOP, E1000_RS, E1000_VLE, E1000_TSE, E1000_DEXT = 0x01, 0x08, 0x40, 0x04, 0x20


def e1000_legacy(addr, length, cmd):
    return struct.pack("<QHBBBBH", addr, length, 0, cmd, 0, 0, 0)


def e1000_context(ipcss, ipcso, ipcse, tucss, tucso, tucmd, hdrlen, mss):
    return struct.pack("<BBHBBHIBBH", ipcss, ipcso, ipcse, tucss, tucso, 0, 0,
                       0, hdrlen, mss)[:11] + bytes([tucmd | E1000_DEXT]) + bytes([0, hdrlen]) \
        + struct.pack("<H", mss)


def e1000_data(addr, length, dcmd, popts):
    return struct.pack("<QI", addr, length | (1 << 20)) [:11] + bytes([dcmd | E1000_DEXT, 0, popts, 0, 0])


def e1000_tcp_frame(payload):
    eth = bytes([0x52, 0x54, 0, 0x12, 0x34, 0x56, 0x52, 0x54, 0, 1, 2, 3, 8, 0])
    ip = bytes([0x45, 0, 0, 0, 0, 0, 0, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2])
    tcp = bytes([0, 80, 0, 81, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x10, 0xff, 0xff, 0x12, 0x34, 0, 0])
    return eth + ip + tcp + bytes(i % 251 for i in range(payload))


def e1000_tx_input(ring_code, head, tail, vme, descriptors, fills=()):
    image = bytearray(0x2000)
    image[:len(descriptors)] = descriptors
    for address, data in fills:
        image[address:address + len(data)] = data
    return bytes([ring_code, head, (tail << 1) | vme]) + bytes(image)


def e1000_tx_seeds():
    frame = bytes([0xff] * 6) + bytes(range(6)) + b"\x88\xb5" + bytes(range(46))
    yield "two_legacy_frames", e1000_tx_input(
        0, 0, 2, 0, e1000_legacy(0x100, 60, E1000_EOP | E1000_RS)
        + e1000_legacy(0x200, 60, E1000_EOP | E1000_RS), [(0x100, frame), (0x200, frame)])
    yield "split_frame_with_vlan", e1000_tx_input(
        0, 0, 2, 1, e1000_legacy(0x100, 20, E1000_VLE)
        + e1000_legacy(0x114, 40, E1000_EOP | E1000_RS | E1000_VLE), [(0x100, frame)])
    tcp = e1000_tcp_frame(100)
    yield "checksum_offload", e1000_tx_input(
        0, 0, 2, 0, e1000_context(14, 24, 33, 34, 50, 0x03, 0, 0)
        + e1000_data(0x100, len(tcp), E1000_EOP | E1000_RS, 0x03), [(0x100, tcp)])
    big = e1000_tcp_frame(1200)
    yield "segmentation_offload", e1000_tx_input(
        0, 0, 2, 0, e1000_context(14, 24, 33, 34, 50, 0x07, 54, 400)
        + e1000_data(0x400, len(big), E1000_EOP | E1000_RS | E1000_TSE, 0x03), [(0x400, big)])
    yield "ring_without_eop", e1000_tx_input(
        0, 3, 2, 0, b"".join(e1000_legacy(0x100, 64, 0) for _ in range(8)), [(0x100, frame)])
    yield "buffer_outside_memory", e1000_tx_input(
        0, 0, 1, 0, e1000_legacy(0xffff_ffff_ffff_0000, 64, E1000_EOP | E1000_RS))


def e1000_op(op, offset, value=0):
    return struct.pack("<BHI", op, offset // 4, value)


def e1000_register_seeds():
    reset = e1000_op(1, 0x0000, 1 << 26)
    eerd = b"".join(e1000_op(1, 0x14, (w << 8) | 1) + e1000_op(0, 0x14) for w in (0, 1, 2, 0x3f))
    mdic = b"".join(e1000_op(1, 0x20, (2 << 26) | (1 << 21) | (r << 16)) + e1000_op(0, 0x20)
                    for r in (1, 2, 3, 17))
    yield "driver_probe", reset + eerd + mdic + e1000_op(1, 0xd0, 0x9d) + e1000_op(1, 0xc8, 4) \
        + e1000_op(0, 0xc0)
    rx = (e1000_op(5, 0, 1) + e1000_op(1, 0x2800, 0x1000) + e1000_op(1, 0x2808, 128)
          + e1000_op(1, 0x2818, 7) + e1000_op(1, 0x100, 2 | (1 << 15)) + e1000_op(1, 0xd0, 0x80))
    yield "receive_frames", rx + e1000_op(4, 0, 60) + e1000_op(4, 0, (1 << 16) | 1514) \
        + e1000_op(4, 0, 9000) + e1000_op(0, 0xc0) + e1000_op(0, 0x4074)
    yield "transmit_zero_ring", e1000_op(5, 0, 1) + e1000_op(1, 0x3808, 128) \
        + e1000_op(1, 0x400, 2) + e1000_op(1, 0x3818, 5) + e1000_op(0, 0x3810)
    yield "io_window", e1000_op(3, 0, 0xd0) + e1000_op(3, 4, 0xffff) + e1000_op(2, 4) \
        + e1000_op(3, 0, 0xc8) + e1000_op(3, 4, 1) + e1000_op(1, 0xd8, 0xffffffff)


# ---- vtd_registers (crates/iommu/src/fuzz.rs) ------------------------------------------------
VTD_READ32, VTD_WRITE32, VTD_WRITE64, VTD_DMA, VTD_DMA_WRITE, VTD_IRQ, VTD_IOAPIC = (
    0, 1, 2, 3, 7, 11, 15)
VTD_GCMD, VTD_RTADDR, VTD_FSTS, VTD_IQT, VTD_IQA, VTD_CCMD, VTD_IVA, VTD_IOTLB = (
    0x18, 0x20, 0x34, 0x88, 0x90, 0x28, 0x200, 0x208)
VTD_TE, VTD_SRTP, VTD_QIE, VTD_IRE, VTD_SIRTP = 1 << 31, 1 << 30, 1 << 26, 1 << 25, 1 << 24
VTD_IRTA = 0xb8
VTD_DEVICE = 0x18  # 00:03.0


def vtd_op(kind, offset, value):
    return bytes([kind, offset & 0xff, offset >> 8]) + struct.pack("<Q", value)


def vtd_dma(iova, write=False):
    return bytes([VTD_DMA_WRITE if write else VTD_DMA, VTD_DEVICE, 0]) + struct.pack("<Q", iova)


def vtd_irq(requester, value):
    return bytes([VTD_IRQ, requester, 0]) + struct.pack("<Q", value)


def vtd_ioapic(entry):
    return bytes([VTD_IOAPIC, 0, 0]) + struct.pack("<Q", entry)


def vtd_input(ops, fills):
    image = bytearray(0xc000)
    for at, data in fills:
        image[at : at + len(data)] = data
    return bytes([len(ops)]) + b"".join(ops) + bytes(image)


def vtd_tables(aw, leaf_level):
    """Root 0x1000 -> context 0x2000 (device 00:03.0, domain 7) -> tables from 0x3000; IOVA
    0x20_1000 maps read/write to 0x8000 through a 4K leaf (`leaf_level` 1) or to 0x1000 through
    the 2M page at 0 (`leaf_level` 2)."""
    levels = 3 if aw == 1 else 4
    fills = [(0x1000, struct.pack("<QQ", 0x2000 | 1, 0)),
             (0x2000 + VTD_DEVICE * 16, struct.pack("<QQ", 0x3000 | 1, (7 << 8) | aw))]
    table, iova = 0x3000, 0x20_1000
    for level in range(levels, leaf_level, -1):
        index = (iova >> (12 + 9 * (level - 1))) & 0x1ff
        fills.append((table + index * 8, struct.pack("<Q", (table + 0x1000) | 3)))
        table += 0x1000
    index = (iova >> (12 + 9 * (leaf_level - 1))) & 0x1ff
    leaf = 0x8000 | 3 if leaf_level == 1 else 0 | 3 | 0x80
    fills.append((table + index * 8, struct.pack("<Q", leaf)))
    return fills


VTD_ENABLE = [vtd_op(VTD_WRITE64, VTD_RTADDR, 0x1000), vtd_op(VTD_WRITE32, VTD_GCMD, VTD_SRTP),
              vtd_op(VTD_WRITE32, VTD_GCMD, VTD_TE)]


def vtd_seeds():
    yield "translation_off_dma", vtd_input([vtd_dma(0x8000), vtd_dma(0x8000, True)], [])
    yield "four_level_tables", vtd_input(
        VTD_ENABLE + [vtd_dma(0x20_1000), vtd_dma(0x20_1008, True), vtd_dma(0x9000),
                      vtd_op(VTD_READ32, VTD_FSTS, 0), vtd_op(VTD_WRITE32, 0x220 + 12, 1 << 31)],
        vtd_tables(2, 1))
    yield "three_level_2m_page", vtd_input(
        VTD_ENABLE + [vtd_dma(0x20_1000), vtd_dma(0x20_8000, True)], vtd_tables(1, 2))
    wait = struct.pack("<QQ", (0x77 << 32) | (1 << 5) | (1 << 4) | 5, 0xb000)
    queue = (struct.pack("<QQ", (1 << 4) | 1, 0) + struct.pack("<QQ", (1 << 4) | 2, 0)
             + struct.pack("<QQ", (7 << 16) | (3 << 4) | 2, 0x20_1000) + wait
             + struct.pack("<QQ", 4, 0))
    yield "invalidation_queue", vtd_input(
        VTD_ENABLE + [vtd_dma(0x20_1000), vtd_op(VTD_WRITE64, VTD_IQA, 0xa000),
                      vtd_op(VTD_WRITE32, VTD_GCMD, VTD_TE | VTD_QIE),
                      vtd_op(VTD_WRITE64, VTD_IQT, 4 << 4), vtd_dma(0x20_1000),
                      vtd_op(VTD_WRITE64, VTD_IQT, 5 << 4), vtd_op(VTD_WRITE32, VTD_FSTS, 0x10)],
        vtd_tables(2, 1) + [(0xa000, queue)])
    yield "register_invalidation", vtd_input(
        VTD_ENABLE + [vtd_dma(0x20_1000), vtd_op(VTD_WRITE64, VTD_CCMD, (1 << 63) | (1 << 61)),
                      vtd_op(VTD_WRITE64, VTD_IVA, 0x20_1000),
                      vtd_op(VTD_WRITE64, VTD_IOTLB, (1 << 63) | (3 << 60) | (7 << 32)),
                      vtd_dma(0x20_1000, True)],
        vtd_tables(2, 1))
    # Interrupt remapping: IRTE 0 at 0x9000 (present, vector 0x41, xAPIC destination 1, SVT 1
    # with SID 00:03.0); IRTA (2 entries), SIRTP, IRE; then a remappable request for index 0
    # from the device (passes), from 00:04.0 (SID fault 0x26), for index 2 (beyond the table,
    # 0x21) and a compatibility-format one (blocked, 0x25).
    irte = struct.pack("<QQ", 1 | (0x41 << 16) | (1 << 40), VTD_DEVICE | (1 << 18))
    yield "interrupt_remapping", vtd_input(
        [vtd_op(VTD_WRITE64, VTD_IRTA, 0x9000), vtd_op(VTD_WRITE32, VTD_GCMD, VTD_SIRTP),
         vtd_op(VTD_WRITE32, VTD_GCMD, VTD_IRE), vtd_irq(VTD_DEVICE, 0x10),
         vtd_irq(0x20, 0x10), vtd_irq(VTD_DEVICE, 0x10 | (2 << 5)),
         vtd_irq(VTD_DEVICE, 0x1000 | (0x30 << 32))],
        [(0x9000, irte)])
    # The IOAPIC front: IRTE 0 with SVT 1 for the IOAPIC's ff:00.0; a remappable entry for
    # index 0 (passes), the same from an IRTE naming 00:03.0 (refused), a compatibility one
    # (blocked while CFIS is clear).
    ioapic_irte = struct.pack("<QQ", 1 | (0x41 << 16), 0xff00 | (1 << 18))
    yield "ioapic_entries", vtd_input(
        [vtd_op(VTD_WRITE64, VTD_IRTA, 0x9000), vtd_op(VTD_WRITE32, VTD_GCMD, VTD_SIRTP),
         vtd_op(VTD_WRITE32, VTD_GCMD, VTD_IRE), vtd_ioapic((1 << 48) | 4),
         vtd_ioapic((1 << 49) | (1 << 48) | 4), vtd_ioapic(0x31)],
        [(0x9000, ioapic_irte), (0x9010, irte)])
# --- nvme_command: [mode, 64-byte SQE, guest memory] -----------------------------------------
def sqe(opcode, nsid=1, psdt=0, cid=1, prp1=0, prp2=0, cdw10=0, cdw11=0, cdw12=0, sgl=None):
    head = struct.pack("<BBHI", opcode, psdt << 6, cid, nsid) + bytes(16)
    pointer = sgl if sgl is not None else struct.pack("<QQ", prp1, prp2)
    return head + pointer + struct.pack("<IIIIII", cdw10, cdw11, cdw12, 0, 0, 0)


def sgl_desc(addr, length, kind):
    return struct.pack("<QI3xB", addr, length, kind << 4)


def guest(fills, size=0x4000):
    mem = bytearray(size)
    for at, data in fills:
        mem[at:at + len(data)] = data
    return bytes(mem)


def nvme_command_seeds():
    io, admin = 0, 1
    prp_list = struct.pack("<QQQ", 0x2000, 0x3000, 0x4000)
    yield "read_one_block", bytes([io]) + sqe(0x02, prp1=0x1000)
    yield "write_prp_list", bytes([io]) + sqe(0x01, prp1=0x1200, prp2=0x800, cdw12=23) + \
        guest([(0x800, prp_list)])
    yield "write_two_pages_prp2", bytes([io]) + sqe(0x01, prp1=0x1000, prp2=0x3000, cdw12=15)
    yield "read_sgl_last_segment", bytes([io]) + sqe(
        0x02, psdt=1, cdw12=7, sgl=sgl_desc(0x800, 32, 3)) + guest(
            [(0x800, sgl_desc(0x1000, 1024, 0) + sgl_desc(0x2000, 3072, 0))])
    yield "read_sgl_chained_segments", bytes([io]) + sqe(
        0x02, psdt=1, cdw12=7, sgl=sgl_desc(0x800, 32, 2)) + guest(
            [(0x800, sgl_desc(0x1000, 512, 0) + sgl_desc(0x900, 16, 3)),
             (0x900, sgl_desc(0x2000, 3584, 0))])
    yield "dsm_deallocate", bytes([io]) + sqe(0x09, prp1=0x800, cdw10=1, cdw11=4) + guest(
        [(0x800, struct.pack("<IIQ", 0, 8, 0) + struct.pack("<IIQ", 0, 16, 100))])
    yield "write_zeroes_deac", bytes([io]) + sqe(0x08, cdw10=10, cdw12=(1 << 25) | 7)
    yield "flush_broadcast", bytes([io]) + sqe(0x00, nsid=0xffffffff)
    yield "read_lba_out_of_range", bytes([io]) + sqe(0x02, prp1=0x1000, cdw10=2047, cdw12=1)
    yield "identify_controller", bytes([admin]) + sqe(0x06, nsid=0, prp1=0x1000, cdw10=1)
    yield "identify_namespace", bytes([admin]) + sqe(0x06, prp1=0x1000, cdw10=0)
    yield "create_cq", bytes([admin]) + sqe(0x05, nsid=0, prp1=0x2000, cdw10=1 | (15 << 16),
                                            cdw11=3 | (1 << 16))
    yield "get_log_smart", bytes([admin]) + sqe(0x02, nsid=0xffffffff, prp1=0x1000,
                                                cdw10=2 | (127 << 16))
    yield "set_features_queues", bytes([admin]) + sqe(0x09, nsid=0, cdw10=7, cdw11=0x30003)
    yield "doorbell_buffer_config", bytes([admin]) + sqe(0x7c, nsid=0, prp1=0x3000,
                                                         prp2=0x4000)
    yield "async_event_request", bytes([admin]) + sqe(0x0c, nsid=0)


# --- nvme_registers: ops [kind, width, offset u16, value u64] ---------------------------------
def reg(kind, width, offset, value=0):
    return struct.pack("<BBHQ", kind, {1: 0, 2: 1, 4: 2, 8: 3}[width], offset, value)


def nvme_register_seeds():
    enable = reg(1, 4, 0x24, 0x000f000f) + reg(1, 8, 0x28, 0x8000) + reg(1, 8, 0x30, 0x9000) + \
        reg(1, 4, 0x14, 1 | (6 << 16) | (4 << 20))
    command_at = lambda at, words: b"".join(reg(4, 8, at + 8 * i, w) for i, w in enumerate(words))
    create_cq = command_at(0x8000, [0x05 | (1 << 16), 0, 0, 0xa000, 0, 1 | (15 << 16) | (3 << 32)])
    create_sq = command_at(0x8040, [0x01 | (2 << 16), 0, 0, 0xb000, 0, 1 | (15 << 16) | ((1 | (1 << 16)) << 32)])
    read = command_at(0xb000, [0x02 | (3 << 16) | (1 << 32), 0, 0, 0xc000, 0, 0, 0])
    yield "enable_and_read_status", enable + reg(0, 4, 0x1c) + reg(0, 8, 0x00)
    yield "create_queues_and_read", enable + create_cq + create_sq + reg(1, 4, 0x1000, 2) + \
        read + reg(1, 4, 0x1008, 1) + reg(1, 4, 0x100c, 1)
    yield "reset_after_enable", enable + reg(1, 4, 0x14, 0) + reg(0, 4, 0x1c)
    yield "shutdown", enable + reg(1, 4, 0x14, 1 | (1 << 14) | (6 << 16) | (4 << 20))
    yield "msix_enable_and_table", reg(3, 2, 0x42, 0x8000) + reg(2, 4, 0, 0xfee00000) + \
        reg(2, 4, 12, 0) + enable
    yield "intms_intmc", enable + reg(1, 4, 0x0c, 1) + reg(1, 4, 0x10, 1)
    yield "bad_doorbells", enable + reg(1, 4, 0x1000, 0xffff) + reg(1, 4, 0x1ff8, 1) + \
        reg(1, 2, 0x1004, 1)


# --- pci_config_space: a function's config space as sysfs gives it (sluice host-check) --------
def config_space(port_type, extended, size=4096):
    """A PCIe capability of `port_type` at 0x40, then the extended capabilities chained from
    0x100: (id, body bytes)."""
    data = bytearray(size)
    data[0x06] = 1 << 4
    data[0x34] = 0x40
    data[0x40:0x44] = bytes([0x10, 0]) + struct.pack("<H", 2 | port_type << 4)
    offset = 0x100
    for index, (cap_id, payload) in enumerate(extended):
        nxt = 0 if index + 1 == len(extended) else (offset + 4 + len(payload) + 3) & ~3
        data[offset:offset + 4] = struct.pack("<I", cap_id | 1 << 16 | nxt << 20)
        data[offset + 4:offset + 4 + len(payload)] = payload
        offset = nxt
    return bytes(data[:size])


def config_space_seeds():
    acs_all = struct.pack("<HH", 0x1f, 0x1d)
    yield "root_port_aer_acs", config_space(4, [(0x0001, bytes(40)), (0x000d, acs_all)])
    yield "endpoint_sriov", config_space(0, [(0x0010, bytes(60))])
    yield "non_root_64_bytes", config_space(4, [(0x000d, acs_all)], size=64)
    looping = bytearray(config_space(6, [(0x000d, acs_all)]))
    looping[0x100:0x104] = struct.pack("<I", 0x000d | 1 << 16 | 0x100 << 20)
    yield "extended_loop", bytes(looping)
    standard_loop = bytearray(config_space(0, []))
    standard_loop[0x41] = 0x40
    yield "standard_loop", bytes(standard_loop)


# --- api_request: [method selector][url]\n[body] ------------------------------------------------
def api_seeds():
    """The documented endpoints with their methods, wrong methods, bodies and answers."""
    get, put, post = 0, 1, 2
    return [
        ("ping", bytes([get]) + b"/api/v1/vmm.ping\n"),
        ("info", bytes([get]) + b"/api/v1/vm.info?x=1\n"),
        ("pause", bytes([put]) + b"/api/v1/vm.pause\n{}"),
        ("pause_body", bytes([put]) + b"/api/v1/vm.pause\n{\"a\":1}"),
        ("resume_conflict", bytes([put]) + b"/api/v1/vm.resume\n"),
        ("wrong_method", bytes([post]) + b"/api/v1/vm.info\n"),
        ("unknown", bytes([get]) + b"/api/v2/../vm.info\n"),
        ("metrics", bytes([get]) + b"/metrics\n"),
        ("add_disk", bytes([put]) + b"/api/v1/vm.add-disk\n{\"path\":\"/d.img\",\"readonly\":true,\"id\":\"d1\"}"),
        ("add_disk_nested", bytes([put]) + b"/api/v1/vm.add-disk\n{\"path\":{\"a\":[1]}}"),
        ("add_net_comma", bytes([put]) + b"/api/v1/vm.add-net\n{\"tap\":\"t0,mac=1\"}"),
        ("remove_device", bytes([put]) + b"/api/v1/vm.remove-device\n{\"id\":\"disk0\"}"),
        ("remove_unknown", bytes([put]) + b"/api/v1/vm.remove-device\n{\"id\":\"nope\",\"x\":1}"),
        ("qos_get", bytes([get]) + b"/api/v1/vm.qos\n"),
        ("qos_put", bytes([put]) + b"/api/v1/vm.qos\n{\"id\":\"disk0\",\"iops\":500,\"bps\":\"8M\"}"),
        ("qos_no_id", bytes([put]) + b"/api/v1/vm.qos\n{\"weight\":3}"),
        ("answer", b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n"),
    ]


# --- qos_spec: [selector][spec] -----------------------------------------------------------------
def qos_seeds():
    """Guest and device specs, live changes on a plain and a limited guest, bad values."""
    return [
        ("guest", b"\x00weight=3,iops=1000,iops_burst=50,bps=8M,queue=64"),
        ("change_limited", b"\x01iops=2000"),
        ("burst_alone", b"\x01bps_burst=4K"),
        ("lift", b"\x01iops=0,bps=0,weight=1000"),
        ("huge_rate", b"\x01bps=17179869183G,iops=18446744073709551615"),
        ("huge_rate_small_burst", b"\x01bps=17179869183G,bps_burst=1"),
        ("device", b"\x02depth=2,idle_depth=1,bps=100M,bps_burst=1M"),
        ("bad", b"\x03weight=0,speed=5,iops_burst=0,=,,x"),
        # Live device changes (vm.qos id `device`) on a limited device.
        ("device_live_change", b"\x02iops=900,depth=8,bps_burst=2M"),
        ("device_live_refused", b"\x03iops=0,iops_burst=4,idle_depth=1025"),
    ]


# --- vfio_config: [image_len u16][config image][ops of 8 bytes] -------------------------------
def put32(image, offset, value):
    image[offset:offset + 4] = struct.pack("<I", value)


def nvme_vf_config():
    """An NVMe VF as QEMU builds it, plus MSI and SR-IOV/ACS capabilities the policy hides."""
    c = bytearray(0x200)
    for offset, value in ((0x00, 0x00101b36), (0x04, 0x00100000), (0x08, 0x01080202),
                          (0x10, 0x4), (0x2c, 0x11001af4), (0x34, 0x40), (0x3c, 0x100),
                          (0x40, 0x00035001), (0x44, 3), (0x50, 0x00806005), (0x60, 0x00017011),
                          (0x64, 0x2000), (0x68, 0x3000), (0x70, 0x00020010), (0x78, 0x2810),
                          (0x100, 0x14010010), (0x140, 0x18010001), (0x180, 0x1a01000d),
                          (0x1a0, 0x00010003)):
        put32(c, offset, value)
    return bytes(c)


def vop(write, offset, width_log2, value=0):
    return struct.pack("<BHBI", 1 if write else 0, offset, width_log2, value)


def vfio_input(image, ops):
    return struct.pack("<H", len(image)) + image + b"".join(ops)


def vfio_seeds():
    image = nvme_vf_config()
    reads = [vop(False, offset, 2) for offset in range(0, 0x200, 4)]
    yield "nvme_vf_read_everything", vfio_input(image, reads)
    yield "bar_sizing_and_command", vfio_input(image, [
        vop(True, 0x10, 2, 0xffffffff), vop(True, 0x14, 2, 0xffffffff), vop(False, 0x10, 2),
        vop(True, 0x10, 2, 0xc0000000), vop(True, 0x04, 1, 0x0446), vop(False, 0x04, 2)])
    yield "msix_enable_pm_and_flr", vfio_input(image, [
        vop(True, 0x62, 1, 0xc000), vop(True, 0x44, 1, 3), vop(True, 0x78, 1, 0x8000),
        vop(True, 0x100, 2, 0xffffffff), vop(False, 0x144, 2), vop(True, 0x3d, 0, 1)])
    looping = bytearray(image)
    put32(looping, 0x70, 0x00027010)
    put32(looping, 0x1a0, 0x1a010003)
    yield "capability_loops", vfio_input(bytes(looping), [vop(False, 0x70, 2)])


# --- vhost_iotlb: [op, access, vhost_iotlb_msg] (format in crates/vhost/src/fuzz.rs) -------
IOTLB_USER = 0x7f00_0000_0000  # the fuzz memory table's first region (GPA 0, 1 MiB)


def iotlb_op(op, access, iova, size, uaddr, perm, kind):
    return bytes([op, access]) + struct.pack("<QQQBB6x", iova, size, uaddr, perm, kind)


def iotlb_seeds():
    update = lambda iova, size, uaddr, perm: iotlb_op(0, 0, iova, size, uaddr, perm, 2)
    invalidate = lambda iova, size: iotlb_op(0, 0, iova, size, 0, 0, 3)
    lookup = lambda iova, access: iotlb_op(2, access, iova, 0, 0, 0, 0)
    ring = lambda iova, size, access: iotlb_op(3, access, iova, size, 0, 0, 0)
    yield "update_lookup_invalidate", (update(0x1000, 0x1000, IOTLB_USER + 0x3000, 3)
                                       + lookup(0x1800, 1) + invalidate(0x1000, 0x1000)
                                       + lookup(0x1800, 0))
    yield "read_only_page_written", update(0x2000, 0x1000, IOTLB_USER, 1) + lookup(0x2000, 1)
    yield "ring_across_two_pages", (update(0x10000, 0x1000, IOTLB_USER + 0x5000, 3)
                                    + update(0x11000, 0x1000, IOTLB_USER + 0x6000, 3)
                                    + update(0x20000, 0x1000, IOTLB_USER + 0x5000, 3)
                                    + update(0x21000, 0x1000, IOTLB_USER + 0x9000, 3)
                                    + ring(0x10800, 0x1000, 0) + ring(0x20800, 0x1000, 0))
    yield "bad_updates", (update(0x1000, 0, IOTLB_USER, 3)
                          + update(0xffff_ffff_ffff_f000, 0x2000, IOTLB_USER, 3)
                          + update(0x1000, 0x1000, IOTLB_USER + 0xff800, 3)
                          + update(0x1000, 0x1000, 0x1000, 3) + update(0x1000, 0x1000, IOTLB_USER, 7)
                          + iotlb_op(0, 0, 0x1000, 0x1000, IOTLB_USER, 3, 1))
    yield "overlapping_updates", (update(0x1000, 0x4000, IOTLB_USER, 3)
                                  + update(0x2000, 0x1000, IOTLB_USER + 0x8000, 1)
                                  + lookup(0x1000, 0) + lookup(0x2000, 0) + lookup(0x4000, 2))
    yield "folded_updates", b"".join(iotlb_op(1, i % 3, i * 0x1000, 0x1000, i * 0x3000, 3, 0)
                                     for i in range(64))
# ---- virtio_iommu_request (crates/iommu/src/virtio/fuzz.rs) ----------------------------------
VIOMMU_MAP_UNMAP, VIOMMU_PROBE, VIOMMU_BYPASS = 1, 2, 4
VIOMMU_BLK, VIOMMU_NVME = 0x10, 0x18
VIOMMU_RW = 3


def viommu_attach(domain, endpoint, flags=0):
    return struct.pack("<B3xIII4x", 1, domain, endpoint, flags)


def viommu_detach(domain, endpoint):
    return struct.pack("<B3xII8x", 2, domain, endpoint)


def viommu_map(domain, start, end, phys, flags=VIOMMU_RW):
    return struct.pack("<B3xIQQQI", 3, domain, start, end, phys, flags)


def viommu_unmap(domain, start, end):
    return struct.pack("<B3xIQQ4x", 4, domain, start, end)


def viommu_probe(endpoint):
    return struct.pack("<B3xI64x", 5, endpoint)


def viommu_input(features, requests):
    return bytes([features]) + b"".join(bytes([len(r)]) + r for r in requests)


def viommu_seeds():
    every = VIOMMU_MAP_UNMAP | VIOMMU_PROBE | VIOMMU_BYPASS
    yield "attach_map_unmap_detach", viommu_input(every, [
        viommu_attach(1, VIOMMU_BLK), viommu_map(1, 0x10000, 0x13fff, 0x4000),
        viommu_unmap(1, 0x10000, 0x13fff), viommu_detach(1, VIOMMU_BLK)])
    yield "split_unmap_and_overlap", viommu_input(every, [
        viommu_attach(1, VIOMMU_BLK), viommu_attach(1, VIOMMU_NVME),
        viommu_map(1, 0x0, 0x3fff, 0x0), viommu_map(1, 0x2000, 0x2fff, 0x0),
        viommu_unmap(1, 0x1000, 0x1fff), viommu_unmap(1, 0x0, 0xffffffffffffffff)])
    yield "probe_and_bypass_domain", viommu_input(every, [
        viommu_probe(VIOMMU_BLK), viommu_attach(2, VIOMMU_NVME, 1),
        viommu_map(2, 0x0, 0xfff, 0x0), viommu_attach(2, VIOMMU_BLK)])
    yield "bad_requests", viommu_input(VIOMMU_MAP_UNMAP, [
        b"", b"\x09\x00\x00\x00", viommu_map(1, 0, 0xfff, 0)[:20],
        viommu_attach(1, 0x99), viommu_attach(0x10000, VIOMMU_BLK), viommu_probe(VIOMMU_BLK)])
    yield "move_between_domains", viommu_input(every, [
        viommu_attach(1, VIOMMU_BLK), viommu_map(1, 0x8000, 0x8fff, 0x8000),
        viommu_attach(3, VIOMMU_BLK), viommu_map(3, 0x8000, 0x8fff, 0x9000, 1),
        viommu_detach(1, VIOMMU_BLK), viommu_detach(3, VIOMMU_BLK)])


# --- migration_stream: the stream `sluice run --migrate-from` reads -------------------------------
# Frames: b"SLMG", kind, 3 zero bytes, payload length (u32 LE), FNV-1a over 64-bit LE words
# (kind | length << 8, then the zero-padded payload) as u64 LE, payload. `full_stream` (a whole
# stream with a state) is written by sluice itself (`protocol::send_*`) and kept as committed;
# these are the frame-level seeds around it.

def migration_frame(kind, payload, corrupt=False):
    length = struct.pack("<I", len(payload))
    h = 0xcbf29ce484222325
    padded = payload + bytes(-len(payload) % 8)
    words = [kind | len(payload) << 8] + [struct.unpack_from("<Q", padded, i)[0]
                                          for i in range(0, len(padded), 8)]
    for word in words:
        h = ((h ^ word) * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
    if corrupt:
        h ^= 1
    return b"SLMG" + bytes([kind, 0, 0, 0]) + length + struct.pack("<Q", h) + payload


def migration_hello(cpus=1, memory=16 * 4096, version=1):
    return migration_frame(1, b"sluice-migration" + struct.pack("<IIQ", version, cpus, memory))


def migration_pages(offset, pages, fill=0xAB):
    return migration_frame(2, struct.pack("<Q", offset) + bytes([fill]) * (4096 * pages))


def migration_framed(*messages):
    # 0xff: the body frames [kind][len u16][payload]... itself, with valid checksums.
    return b"\xff" + b"".join(bytes([kind]) + struct.pack("<H", len(p)) + p for kind, p in messages)


def migration_seeds():
    end = migration_frame(4, b"")
    hello = b"sluice-migration" + struct.pack("<IIQ", 1, 1, 16 * 4096)
    return [
        ("framed_pages_state_end", migration_framed(
            (1, hello), (2, struct.pack("<Q", 4096) + b"\x11" * 4096),
            (3, b'{"cpus":1,"memory":65536,"vcpus":[]}'), (4, b""))),
        ("framed_bad_hello", migration_framed((1, hello[:20]), (4, b""))),
        ("pages_then_end", migration_hello() + migration_pages(0, 2) + end),
        ("pages_outside_ram", migration_hello() + migration_pages(15 * 4096, 2) + end),
        ("corrupt_frame", migration_hello() + migration_frame(2, struct.pack("<Q", 0) + bytes(4096), True)),
        ("newer_version", migration_hello(version=2)),
        ("zero_cpus", migration_hello(cpus=0)),
        ("bad_state", migration_hello() + migration_frame(3, b'{"cpus":1}') + end),
        ("ack_instead", migration_hello() + migration_frame(5, struct.pack("<Q", 1))),
        ("huge_length", migration_hello() + b"SLMG\x02\0\0\0\xff\xff\xff\xff" + bytes(8)),
        ("truncated", (migration_hello() + migration_pages(0, 1))[:-100]),
    ]


# --- net_state: virtio-net's saved state (JSON, sluice_devices::net::SavedNet) ----------------
def net_state(pairs=2, ctrl_pairs=1, frames=(), announce=False, mac=(0x52, 0x54, 0, 0, 0, 1)):
    import json
    return json.dumps({"pairs": pairs, "ctrl_pairs": ctrl_pairs, "mac": list(mac),
                       "promisc": True, "allmulti": False, "announce": announce,
                       "rx_frames": [[pair, list(frame)] for pair, frame in frames]}).encode()


def net_state_seeds():
    frame = bytes(12) + bytes([0xff] * 6) + bytes([0x52, 0x54, 0, 0, 0, 1]) + b"\x88\xb5" + bytes(46)
    return [
        ("idle", net_state()),
        ("two_pairs_chosen_announce_pending", net_state(ctrl_pairs=2, announce=True)),
        ("carried_frames", net_state(frames=[(0, frame), (1, frame), (0, frame[:40])])),
        ("other_shape", net_state(pairs=4)),
        ("no_pairs_chosen", net_state(ctrl_pairs=0)),
        ("frame_too_short", net_state(frames=[(0, bytes(4))])),
        ("frame_for_a_missing_pair", net_state(frames=[(7, frame)])),
        ("mac_too_long", net_state(mac=range(7))),
        ("not_json", b"{\"pairs\": 2,"),
    ]


# --- replay_log: a `sluice run --record` log (crates/vmm/src/replay/format.rs, docs/replay.md) --
# b"SLUICERR", version u32 LE, then chunks: b"CHNK", kind (0 meta JSON, 1 events), payload
# length u32 LE, FNV-1a (the migration frames' checksum) u64 LE, payload. `recorded_prefix` is
# the start of a real recording (its meta chunk and first events chunk), kept as committed.

def varint(value):
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value == 0:
            out.append(byte)
            return bytes(out)
        out.append(byte | 0x80)


def replay_chunk(kind, payload, corrupt=False):
    length = struct.pack("<I", len(payload))
    h = 0xcbf29ce484222325
    padded = payload + bytes(-len(payload) % 8)
    for word in [kind | len(payload) << 8] + [
            struct.unpack_from("<Q", padded, i)[0] for i in range(0, len(padded), 8)]:
        h = ((h ^ word) * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
    if corrupt:
        h ^= 1
    return b"CHNK" + bytes([kind]) + length + struct.pack("<Q", h) + payload


def replay_log(*event_chunks, version=1, meta=None):
    if meta is None:
        meta = (b'{"memory":16777216,"cpus":1,"cmdline":"","devices":[],"entry":1048576,'
                b'"protocol":"pvh","protocol_pointer":24576}')
    return (b"SLUICERR" + struct.pack("<I", version) + replay_chunk(0, meta)
            + b"".join(replay_chunk(1, c) for c in event_chunks))


def replay_page(literal):
    # One literal run then zeros up to 4096 bytes.
    rest = 4096 - len(literal)
    return varint(0) + varint(len(literal)) + literal + (varint(rest) + varint(0) if rest else b"")


def replay_exit(kind, addr, data, rip=0x100000, regs=0):
    return b"\x02" + bytes([kind]) + varint(addr) + bytes([len(data)]) + data + varint(rip) + \
        struct.pack("<Q", regs)


def replay_end(outcome=2, value=0, exits=1, memory_hash=0):
    return b"\x05" + bytes([outcome]) + varint(value) + varint(exits) + struct.pack("<Q", memory_hash)


def replay_seeds():
    init = b"\x01" + varint(256) + replay_page(b"\x90" * 16)
    dma = b"\x03" + varint(300) + replay_page(b"\x01\x02\x03")
    dma_again = b"\x03" + varint(300) + replay_page(b"\x00\x00\x00\x04")
    msi = b"\x04" + varint(0xFEE00000) + varint(0x41)
    exits = replay_exit(0, 0x3FD, b"\x60") + replay_exit(3, 0x100003000, bytes(4))
    return [
        ("init_exit_end", replay_log(init + exits + replay_end(exits=2))),
        ("dma_delta_msi", replay_log(exits + dma + dma_again + msi + replay_end(exits=2))),
        ("two_chunks", replay_log(init + exits, dma + replay_end())),
        ("bad_checksum", b"SLUICERR" + struct.pack("<I", 1) + replay_chunk(0, b"{}", corrupt=True)),
        ("newer_version", replay_log(replay_end(), version=2)),
        ("bad_meta", replay_log(replay_end(), meta=b'{"memory":')),
        ("page_overrun", replay_log(b"\x03" + varint(1) + varint(4000) + varint(200) + bytes(200))),
        ("exit_size_9", replay_log(b"\x02\x00" + varint(0x3F8) + b"\x09" + bytes(9))),
        ("varint_overflow", replay_log(b"\x04" + b"\xff" * 10 + b"\x7f")),
        ("unknown_tag", replay_log(b"\x4d")),
        ("truncated", replay_log(init + exits)[:-7]),
        ("huge_chunk", b"SLUICERR" + struct.pack("<I", 1) + b"CHNK\x00\xff\xff\xff\xff" + bytes(8)),
        # 0xff: the body wraps the rest as one checksummed events chunk.
        ("framed_events", b"\xff" + init + exits + dma + dma_again + msi + replay_end(exits=2)),
        ("framed_garbage", b"\xff" + b"\x02\x03" + varint(1 << 40) + b"\x04" + bytes(3)),
    ]


def tpm_op(write, offset, width, value=0):
    """One CRB access: kind (odd = write), offset, width index (1, 2, 4, 8, 3 bytes), value."""
    return struct.pack("<BHBI", 1 if write else 0, offset, {1: 0, 2: 1, 4: 2, 8: 3, 3: 4}[width],
                       value)


def tpm_input(script, ops):
    """The body splits its input at a quarter: the backend's replies, then the accesses."""
    ops = b"".join(ops)
    ops += tpm_op(False, 0, 4) * ((-len(ops) // 8) % 3)
    length = len(ops) // 3
    return (script + bytes(length))[:length] + ops


def tpm_command(locality, words):
    base = locality * 0x1000
    ops = [tpm_op(True, base + 0x08, 4, 1), tpm_op(True, base + 0x40, 4, 1)]
    ops += [tpm_op(True, base + 0x80 + 4 * i, 4, w) for i, w in enumerate(words)]
    return ops + [tpm_op(True, base + 0x4c, 4, 1), tpm_op(False, base + 0x80, 8)]


def blob_answer(data, result=0, flags=0, total=None):
    """A CMD_GET_STATEBLOB answer: result, flags, total length, length (big-endian), blob."""
    length = len(data)
    return struct.pack(">IIII", result, flags, length if total is None else total, length) + data


def tpm_state_input(answers, saved):
    """tpm_state splits its input in halves: swtpm's answers, then the saved state."""
    size = max(len(answers), len(saved))
    return answers.ljust(size, b"\0") + saved.ljust(size, b"\0")


def tpm_saved(active=0, buffer_mode=2, buffer_arg=0, flags=1):
    """The saved-state half: active locality (bit 7: none), buffer length mode and argument,
    idle/fatal bits, cancel and int_enable words, buffer bytes."""
    return bytes([active, buffer_mode, buffer_arg, flags]) + struct.pack("<II", 1, 0) + bytes(range(64))


def tpm_state_seeds():
    ok = struct.pack(">I", 0)
    restore = ok * 4 + ok + bytes(4)  # STOP, SET x2, INIT, then GET_TPMESTABLISHED
    blobs = blob_answer(b"perm") + blob_answer(b"vola") + blob_answer(b"", result=0x800)
    return [
        ("blobs_and_restore_good", tpm_state_input(blobs + restore, tpm_saved())),
        ("blob_over_the_limit", tpm_state_input(blob_answer(b"", total=1 << 24)[:16], tpm_saved())),
        ("blob_lengths_differ", tpm_state_input(blob_answer(b"abcd", total=8), tpm_saved())),
        ("blob_truncated", tpm_state_input(blob_answer(b"perm" * 8)[:24], tpm_saved())),
        ("get_refused", tpm_state_input(blob_answer(b"", result=0x9), tpm_saved())),
        ("stop_refused", tpm_state_input(blobs + struct.pack(">I", 1), tpm_saved())),
        ("saved_buffer_short", tpm_state_input(blobs + restore, tpm_saved(buffer_mode=0, buffer_arg=3))),
        ("saved_buffer_long", tpm_state_input(blobs + restore, tpm_saved(buffer_mode=1, buffer_arg=9))),
        ("saved_locality_beyond_4", tpm_state_input(blobs + restore, tpm_saved(active=6))),
        ("saved_no_locality", tpm_state_input(blobs + restore, tpm_saved(active=0x80))),
    ]


def tpm_seeds():
    startup = [0x00000180, 0x00000c00, 0x00004401]  # 80 01 | 00 00 00 0c | 00 00 01 44, LE words
    good_reply = bytes([0x80, 0x01, 0, 0, 0, 10, 0, 0, 0, 0]) + bytes(6)
    return [
        ("startup_good_reply", tpm_input(good_reply, tpm_command(0, startup))),
        ("reply_beyond_buffer", tpm_input(bytes([0x81, 0x01, 0, 0, 0xff, 0xff]) + bytes(10),
                                          tpm_command(0, startup))),
        ("command_size_huge", tpm_input(good_reply, tpm_command(0, [0xffff0180, 0xffff]))),
        ("other_locality_starts", tpm_input(good_reply, tpm_command(0, startup)[:1]
                                            + tpm_command(3, startup))),
        ("registers_every_width", tpm_input(b"", [tpm_op(w % 2 == 0, off, w, 0xffffffff)
                                                  for off in range(0, 0x80, 4)
                                                  for w in (1, 2, 3, 4, 8)])),
        ("buffer_end_and_past", tpm_input(b"", [tpm_op(True, 0xffe, 8, 0x01020304),
                                                tpm_op(False, 0x4ffe, 4),
                                                tpm_op(False, 0xfffc, 8)])),
    ]


# --- blk_trace: a virtio-blk request log (`--disk ...,requests=LOG`, crates/devices/src/block/
# trace.rs): b"SLUICEBQ", version u32, capacity u64, block size u32, flags u8, serial (20 bytes),
# queue size u16; records b"RQ", length u32, FNV-1a (bytewise) u64, payload. `recorded_prefix`
# and `recorded_write_and_flush` are records of a real recording of the guest kit's blk
# workloads, kept as committed.

def fnv1a_bytes(data):
    h = 0xcbf29ce484222325
    for byte in data:
        h = ((h ^ byte) * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
    return h


def trace_header(version=1, read_only=0):
    return (b"SLUICEBQ" + struct.pack("<IQIB", version, 32768, 512, read_only)
            + b"sluice-disk".ljust(20, b"\0") + struct.pack("<H", 256))


def trace_record(payload):
    return b"RQ" + struct.pack("<IQ", len(payload), fnv1a_bytes(payload)) + payload


def trace_payload(buffers, used_len=1, status=0x100, data_hash=fnv1a_bytes(b"")):
    """buffers: (kind, length, bytes) with kind 0 readable, 1 writable, 2/3 outside."""
    out = struct.pack("<HH", 0, len(buffers))
    for kind, length, data in buffers:
        out += struct.pack("<IB", length, kind) + (data if kind == 0 else b"")
    return out + struct.pack("<IHQ", used_len, status, data_hash)


def blk_trace_seeds():
    read_header = struct.pack("<IIQ", 0, 0, 0)
    read = trace_payload([(0, 16, read_header), (1, 4096, b""), (1, 1, b"")], 4097,
                         data_hash=fnv1a_bytes(bytes(4096)))
    outside = trace_payload([(0, 16, read_header), (2, 512, b""), (1, 1, b"")])
    good = trace_record(read)
    bad = bytearray(good)
    bad[-1] ^= 1
    huge = bytearray(good)
    huge[2:6] = struct.pack("<I", 0xFFFFFFFF)
    return [
        ("header_only", trace_header()),
        ("read_of_zeroes", trace_header() + good),
        ("read_only_disk", trace_header(read_only=1) + good),
        ("outside_buffer", trace_header() + trace_record(outside)),
        ("unknown_kind", trace_header() + trace_record(struct.pack("<HH", 0, 1)
                                                      + struct.pack("<IB", 4, 9)
                                                      + struct.pack("<IHQ", 0, 0, 0))),
        ("bad_checksum", trace_header() + bytes(bad)),
        ("version_2", trace_header(version=2) + good),
        ("truncated_record", trace_header() + good[:-5]),
        ("huge_length", trace_header() + bytes(huge)),
        # Framed by the body (first byte 0xff): header, then [length u16][payload] records.
        ("framed_read_and_outside", b"\xff" + trace_header()
         + struct.pack("<H", len(read)) + read + struct.pack("<H", len(outside)) + outside),
    ]


def main():
    for target, seeds in (("blk_request", blk_seeds()), ("net_header", net_seeds()),
                          ("packed_ring", packed_seeds()),
                          ("virtio_pci_registers", pci_seeds()), ("vhost_user_fds", fds_seeds()),
                          ("vhost_iotlb", iotlb_seeds()),
                          ("vhost_user_backend_replies", backend_seeds()),
                          ("e1000_tx", e1000_tx_seeds()), ("e1000_registers", e1000_register_seeds()),
                          ("vtd_registers", vtd_seeds()),
                          ("nvme_command", nvme_command_seeds()),
                          ("nvme_registers", nvme_register_seeds()),
                          ("pci_config_space", config_space_seeds()),
                          ("vfio_config", vfio_seeds()),
                          ("api_request", api_seeds()),
                          ("qos_spec", qos_seeds()),
                          ("virtio_iommu_request", viommu_seeds()),
                          ("migration_stream", migration_seeds()),
                          ("net_state", net_state_seeds()),
                          ("replay_log", replay_seeds()),
                          ("tpm_crb", tpm_seeds()),
                          ("tpm_state", tpm_state_seeds()),
                          ("blk_trace", blk_trace_seeds())):
        directory = ROOT / target
        directory.mkdir(parents=True, exist_ok=True)
        for name, data in seeds:
            (directory / name).write_bytes(data)


if __name__ == "__main__":
    main()
