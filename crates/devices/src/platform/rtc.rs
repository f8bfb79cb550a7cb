//! MC146818 CMOS real-time clock and its 128 bytes of CMOS memory (index port 0x70, data 0x71).
//!
//! Written by hand: `vm_superio` has only the ARM PL031 RTC, and the calendar arithmetic needed
//! here (Unix seconds ⇄ civil date) is a few lines, not worth a date-time dependency.
//!
//! The guest's time is the host's UTC clock plus an offset. Writing the time registers while
//! register B's SET bit is on stages a new time; clearing SET commits it by moving the offset
//! (the host clock is never touched). Register B's DM bit (binary vs BCD) and 24/12-hour bit are
//! honoured on every access, since the time is kept in binary internally. Register A's UIP bit
//! always reads clear: reads are computed atomically, so there is no update in progress to see.
//! Register C reports UF when a whole second passed since it was last read and clears on read;
//! the alarm and periodic flags are never set and no interrupt (IRQ 8) is raised.

use serde::{Deserialize, Serialize};
use sluice_bus::BusDevice;

use super::clock::WallClock;
use super::single_byte;

/// Index port; data is at offset 1.
pub const RTC_PORT: u16 = 0x70;
pub const RTC_PORT_LEN: u16 = 2;

const INDEX_OFFSET: u64 = 0;
const DATA_OFFSET: u64 = 1;
/// Bit 7 of the index port gates NMIs on a PC, it is not part of the CMOS index.
const INDEX_MASK: u8 = 0x7f;
const CMOS_SIZE: usize = 128;

const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_DAY_OF_WEEK: u8 = 0x06;
const REG_DAY_OF_MONTH: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;
/// Century byte, where ACPI's FADT CENTURY field and PC firmware put it.
const REG_CENTURY: u8 = 0x32;

/// Divider 010 (32.768 kHz time base), rate 0110 (1024 Hz periodic rate).
const REG_A_DEFAULT: u8 = 0x26;
const REG_A_UPDATE_IN_PROGRESS: u8 = 0x80;
const REG_B_SET: u8 = 0x80;
const REG_B_UPDATE_INTERRUPT: u8 = 0x10;
const REG_B_BINARY: u8 = 0x04;
const REG_B_24_HOUR: u8 = 0x02;
const REG_B_DEFAULT: u8 = REG_B_24_HOUR;
const REG_C_IRQ: u8 = 0x80;
const REG_C_UPDATE_ENDED: u8 = 0x10;
/// Valid RAM and time: the battery is fine.
const REG_D_VALID: u8 = 0x80;
const HOUR_PM: u8 = 0x80;

// Memory-size bytes as PC firmware (and QEMU) lay them out.
const REG_BASE_MEMORY_KIB: usize = 0x15;
const REG_EXTENDED_KIB: usize = 0x17;
const REG_EXTENDED_KIB_COPY: usize = 0x30;
const REG_ABOVE_16M_64K: usize = 0x34;
const REG_ABOVE_4G_64K: usize = 0x5b;
const BASE_MEMORY_KIB: u16 = 640;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const UNIT_64K: u64 = 64 << 10;

/// The RTC and CMOS memory.
/// What the guest set in the RTC, for a snapshot: its time as an offset from the host's clock
/// (so the guest's clock keeps running with the host's across a restore, as with QEMU's
/// `base=utc`), the index register, the CMOS bytes and the control registers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RtcRegisters {
    pub offset_secs: i64,
    pub index: u8,
    pub cmos: Vec<u8>,
    pub reg_a: u8,
    pub reg_b: u8,
    /// A time being composed under register B's SET bit.
    pub staged: Option<DateTime>,
}

pub struct Rtc {
    clock: Box<dyn WallClock>,
    /// Guest time minus host time, in seconds.
    offset_secs: i64,
    index: u8,
    cmos: [u8; CMOS_SIZE],
    reg_a: u8,
    reg_b: u8,
    /// The time the guest is composing while SET is on.
    staged: Option<DateTime>,
    /// Host second at which register C was last read (for UF).
    c_read_at_secs: i64,
}

impl BusDevice for Rtc {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        let value = match (offset, data.len()) {
            (DATA_OFFSET, 1) => self.read_register(self.index),
            _ => 0xff,
        };
        data.fill(value);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let Some(value) = single_byte(data) else {
            return;
        };
        match offset {
            INDEX_OFFSET => self.index = value & INDEX_MASK,
            DATA_OFFSET => self.write_register(self.index, value),
            _ => {}
        }
    }
}

impl Rtc {
    /// An RTC showing `clock`'s UTC time.
    pub fn new(clock: Box<dyn WallClock>) -> Self {
        let c_read_at_secs = host_secs(clock.as_ref());
        Self {
            clock,
            offset_secs: 0,
            index: 0,
            cmos: [0; CMOS_SIZE],
            reg_a: REG_A_DEFAULT,
            reg_b: REG_B_DEFAULT,
            staged: None,
            c_read_at_secs,
        }
    }

    /// What the guest set (the VM is paused).
    pub fn save_registers(&self) -> RtcRegisters {
        RtcRegisters {
            offset_secs: self.offset_secs,
            index: self.index,
            cmos: self.cmos.to_vec(),
            reg_a: self.reg_a,
            reg_b: self.reg_b,
            staged: self.staged,
        }
    }

    /// Puts back what [`Rtc::save_registers`] returned.
    pub fn restore_registers(&mut self, saved: &RtcRegisters) -> Result<(), String> {
        self.cmos = saved.cmos.as_slice().try_into().map_err(|_| {
            format!(
                "rtc: {} CMOS bytes saved, the RTC has {CMOS_SIZE}",
                saved.cmos.len()
            )
        })?;
        self.offset_secs = saved.offset_secs;
        self.index = saved.index & INDEX_MASK;
        self.reg_a = saved.reg_a & !REG_A_UPDATE_IN_PROGRESS;
        self.reg_b = saved.reg_b;
        self.staged = saved.staged;
        Ok(())
    }

    /// Fills the CMOS memory-size bytes firmware reads: base memory (0x15/0x16, KiB), memory
    /// from 1 MiB up to 64 MiB (0x17/0x18 and 0x30/0x31, KiB), memory above 16 MiB (0x34/0x35,
    /// 64 KiB units) and above 4 GiB (0x5b..0x5d, 64 KiB units). Each saturates at its width.
    pub fn set_memory_size(&mut self, ram_below_4g: u64, ram_above_4g: u64) {
        let extended_kib = (ram_below_4g / KIB).saturating_sub(1024);
        let above_16m = ram_below_4g.saturating_sub(16 * MIB) / UNIT_64K;
        let above_4g = ram_above_4g / UNIT_64K;
        self.set_cmos_le(REG_BASE_MEMORY_KIB, u64::from(BASE_MEMORY_KIB), 2);
        self.set_cmos_le(REG_EXTENDED_KIB, extended_kib, 2);
        self.set_cmos_le(REG_EXTENDED_KIB_COPY, extended_kib, 2);
        self.set_cmos_le(REG_ABOVE_16M_64K, above_16m, 2);
        self.set_cmos_le(REG_ABOVE_4G_64K, above_4g, 3);
    }

    /// Stores `value` little-endian in `width` bytes at `index`, saturating.
    fn set_cmos_le(&mut self, index: usize, value: u64, width: usize) {
        let max = (1u64 << (8 * width)) - 1;
        let bytes = value.min(max).to_le_bytes();
        if let Some(dst) = self.cmos.get_mut(index..index + width) {
            dst.copy_from_slice(&bytes[..width]);
        }
    }

    fn binary(&self) -> bool {
        self.reg_b & REG_B_BINARY != 0
    }

    fn hour_24(&self) -> bool {
        self.reg_b & REG_B_24_HOUR != 0
    }

    fn now_secs(&self) -> i64 {
        host_secs(self.clock.as_ref()).saturating_add(self.offset_secs)
    }

    /// The time the guest sees: the staged time while SET is on, else the running clock.
    fn current_time(&self) -> DateTime {
        self.staged
            .unwrap_or_else(|| DateTime::from_unix(self.now_secs()))
    }

    fn read_register(&mut self, index: u8) -> u8 {
        let time = self.current_time();
        match index {
            REG_SECONDS => self.encode(time.second),
            REG_MINUTES => self.encode(time.minute),
            REG_HOURS => self.encode_hour(time.hour),
            REG_DAY_OF_WEEK => self.encode(time.day_of_week()),
            REG_DAY_OF_MONTH => self.encode(time.day),
            REG_MONTH => self.encode(time.month),
            REG_YEAR => self.encode(time.year_in_century()),
            REG_CENTURY => self.encode(time.century()),
            REG_A => self.reg_a & !REG_A_UPDATE_IN_PROGRESS,
            REG_B => self.reg_b,
            REG_C => self.read_and_clear_flags(),
            REG_D => REG_D_VALID,
            // Alarms (0x01/0x03/0x05) and plain CMOS bytes are storage.
            _ => self.cmos.get(usize::from(index)).copied().unwrap_or(0xff),
        }
    }

    fn write_register(&mut self, index: u8, value: u8) {
        match index {
            REG_SECONDS | REG_MINUTES | REG_HOURS | REG_DAY_OF_MONTH | REG_MONTH | REG_YEAR
            | REG_CENTURY => self.write_time_field(index, value),
            // Derived from the date; the guest cannot make Tuesday a Friday.
            REG_DAY_OF_WEEK => {}
            REG_A => self.reg_a = value & !REG_A_UPDATE_IN_PROGRESS,
            REG_B => self.write_reg_b(value),
            REG_C | REG_D => {}
            // Alarms are stored but never fire.
            _ => {
                if let Some(byte) = self.cmos.get_mut(usize::from(index)) {
                    *byte = value;
                }
            }
        }
    }

    fn write_reg_b(&mut self, value: u8) {
        let was_set = self.reg_b & REG_B_SET != 0;
        let set = value & REG_B_SET != 0;
        self.reg_b = value;
        match (was_set, set) {
            (false, true) => {
                // SET stops updates and, per the datasheet, clears the update interrupt enable.
                self.reg_b &= !REG_B_UPDATE_INTERRUPT;
                self.staged = Some(self.current_time());
            }
            (true, false) => {
                if let Some(time) = self.staged.take() {
                    self.commit(time);
                }
            }
            _ => {}
        }
    }

    fn write_time_field(&mut self, index: u8, value: u8) {
        let Some(decoded) = self.decode_field(index, value) else {
            tracing::debug!(index, value, "ignored malformed RTC time write");
            return;
        };
        let mut time = self.current_time();
        match index {
            REG_SECONDS => time.second = decoded,
            REG_MINUTES => time.minute = decoded,
            REG_HOURS => time.hour = decoded,
            REG_DAY_OF_MONTH => time.day = decoded,
            REG_MONTH => time.month = decoded,
            REG_YEAR => time.year = time.year - time.year.rem_euclid(100) + i64::from(decoded),
            REG_CENTURY => time.year = i64::from(decoded) * 100 + time.year.rem_euclid(100),
            _ => return,
        }
        if self.reg_b & REG_B_SET != 0 {
            // Fields may be inconsistent until SET clears (day 31 written before the month).
            self.staged = Some(time);
        } else {
            self.commit(time);
        }
    }

    fn commit(&mut self, time: DateTime) {
        match time.to_unix() {
            Some(guest_secs) => {
                self.offset_secs = guest_secs.saturating_sub(host_secs(self.clock.as_ref()));
            }
            None => tracing::warn!(?time, "guest set an invalid RTC time; ignored"),
        }
    }

    fn read_and_clear_flags(&mut self) -> u8 {
        let now = host_secs(self.clock.as_ref());
        let updating = self.reg_b & REG_B_SET == 0;
        let mut flags = 0;
        if updating && now > self.c_read_at_secs {
            flags |= REG_C_UPDATE_ENDED;
            if self.reg_b & REG_B_UPDATE_INTERRUPT != 0 {
                flags |= REG_C_IRQ;
            }
        }
        self.c_read_at_secs = now;
        flags
    }

    fn encode(&self, value: u8) -> u8 {
        if self.binary() {
            value
        } else {
            to_bcd(value)
        }
    }

    fn encode_hour(&self, hour: u8) -> u8 {
        if self.hour_24() {
            return self.encode(hour);
        }
        let pm = if hour >= 12 { HOUR_PM } else { 0 };
        let hour_12 = match hour % 12 {
            0 => 12,
            h => h,
        };
        self.encode(hour_12) | pm
    }

    fn decode(&self, value: u8) -> Option<u8> {
        if self.binary() {
            Some(value)
        } else {
            from_bcd(value)
        }
    }

    fn decode_field(&self, index: u8, value: u8) -> Option<u8> {
        if index != REG_HOURS || self.hour_24() {
            return self.decode(value);
        }
        let hour_12 = self.decode(value & !HOUR_PM)?;
        if !(1..=12).contains(&hour_12) {
            return None;
        }
        let pm = if value & HOUR_PM != 0 { 12 } else { 0 };
        Some(hour_12 % 12 + pm)
    }
}

fn host_secs(clock: &dyn WallClock) -> i64 {
    i64::try_from(clock.since_epoch().as_secs()).unwrap_or(i64::MAX)
}

fn to_bcd(value: u8) -> u8 {
    let value = value % 100;
    ((value / 10) << 4) | (value % 10)
}

fn from_bcd(value: u8) -> Option<u8> {
    let (high, low) = (value >> 4, value & 0x0f);
    (high <= 9 && low <= 9).then_some(high * 10 + low)
}

const SECS_PER_DAY: i64 = 86_400;
/// Days from 0000-03-01 to 1970-01-01 in the proleptic Gregorian calendar.
const DAYS_0000_03_01_TO_EPOCH: i64 = 719_468;
const DAYS_PER_400_YEARS: i64 = 146_097;

/// A UTC calendar time. Fields may hold out-of-range values while a guest composes a time; only
/// [`DateTime::to_unix`] validates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DateTime {
    year: i64,
    month: u8,
    day: u8,
    hour: u8,
    minute: u8,
    second: u8,
}

impl DateTime {
    fn from_unix(secs: i64) -> Self {
        let days = secs.div_euclid(SECS_PER_DAY);
        let of_day = secs.rem_euclid(SECS_PER_DAY);
        let (year, month, day) = civil_from_days(days);
        Self {
            year,
            month,
            day,
            // of_day < 86400, so these fit.
            hour: (of_day / 3600) as u8,
            minute: (of_day / 60 % 60) as u8,
            second: (of_day % 60) as u8,
        }
    }

    fn to_unix(self) -> Option<i64> {
        let valid = (1..=12).contains(&self.month)
            && self.day >= 1
            && self.day <= days_in_month(self.year, self.month)
            && self.hour < 24
            && self.minute < 60
            && self.second < 60
            && (0..=9999).contains(&self.year);
        valid.then(|| {
            let days = days_from_civil(self.year, self.month, self.day);
            days * SECS_PER_DAY
                + i64::from(self.hour) * 3600
                + i64::from(self.minute) * 60
                + i64::from(self.second)
        })
    }

    /// 1 = Sunday .. 7 = Saturday, as the MC146818 counts.
    fn day_of_week(&self) -> u8 {
        let days = days_from_civil(self.year, self.month.clamp(1, 12), self.day.max(1));
        // 1970-01-01 was a Thursday (4 with Sunday = 0).
        ((days + 4).rem_euclid(7) + 1) as u8
    }

    fn year_in_century(&self) -> u8 {
        self.year.rem_euclid(100) as u8
    }

    fn century(&self) -> u8 {
        self.year.div_euclid(100).rem_euclid(100) as u8
    }
}

fn is_leap_year(year: i64) -> bool {
    year % 4 == 0 && (year % 100 != 0 || year % 400 == 0)
}

fn days_in_month(year: i64, month: u8) -> u8 {
    match month {
        2 if is_leap_year(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01. Counts years from March so the leap day ends a year.
fn days_from_civil(year: i64, month: u8, day: u8) -> i64 {
    let (month, day) = (i64::from(month), i64::from(day));
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month_from_march = (month + 9) % 12;
    let day_of_year = (153 * month_from_march + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * DAYS_PER_400_YEARS + day_of_era - DAYS_0000_03_01_TO_EPOCH
}

/// The inverse of [`days_from_civil`]: (year, month, day).
fn civil_from_days(days: i64) -> (i64, u8, u8) {
    let days = days + DAYS_0000_03_01_TO_EPOCH;
    let era = days.div_euclid(DAYS_PER_400_YEARS);
    let day_of_era = days - era * DAYS_PER_400_YEARS;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * month_from_march + 2) / 5 + 1) as u8;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    } as u8;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::platform::clock::ManualClock;
    use crate::platform::testing::fuzz_device;

    const BASE: u64 = RTC_PORT as u64;
    const REG_SECONDS_ALARM: u8 = 0x01;
    const REG_MINUTES_ALARM: u8 = 0x03;
    const REG_HOURS_ALARM: u8 = 0x05;
    /// 2026-11-22 13:45:30 UTC, a Sunday.
    const SUNDAY_AFTERNOON: u64 = 1_795_355_130;

    fn rtc_at(unix_secs: u64) -> (Rtc, ManualClock) {
        let clock = ManualClock::new(Duration::from_secs(unix_secs));
        (Rtc::new(Box::new(clock.clone())), clock)
    }

    fn read(rtc: &mut Rtc, index: u8) -> u8 {
        rtc.write(BASE, INDEX_OFFSET, &[index]);
        let mut data = [0u8];
        rtc.read(BASE, DATA_OFFSET, &mut data);
        data[0]
    }

    fn write(rtc: &mut Rtc, index: u8, value: u8) {
        rtc.write(BASE, INDEX_OFFSET, &[index]);
        rtc.write(BASE, DATA_OFFSET, &[value]);
    }

    fn read_time(rtc: &mut Rtc) -> [u8; 8] {
        [
            REG_CENTURY,
            REG_YEAR,
            REG_MONTH,
            REG_DAY_OF_MONTH,
            REG_DAY_OF_WEEK,
            REG_HOURS,
            REG_MINUTES,
            REG_SECONDS,
        ]
        .map(|index| read(rtc, index))
    }

    #[test]
    fn reads_host_time_in_bcd_by_default() {
        let (mut rtc, _) = rtc_at(SUNDAY_AFTERNOON);

        let time = read_time(&mut rtc);

        assert_eq!(time, [0x20, 0x26, 0x11, 0x22, 0x01, 0x13, 0x45, 0x30]);
    }

    #[test]
    fn reads_binary_when_dm_set() {
        let (mut rtc, _) = rtc_at(SUNDAY_AFTERNOON);

        write(&mut rtc, REG_B, REG_B_24_HOUR | REG_B_BINARY);
        let time = read_time(&mut rtc);

        assert_eq!(time, [20, 26, 11, 22, 1, 13, 45, 30]);
    }

    #[test]
    fn twelve_hour_mode_sets_pm_bit() {
        let (mut rtc, clock) = rtc_at(SUNDAY_AFTERNOON);
        write(&mut rtc, REG_B, 0);

        let afternoon = read(&mut rtc, REG_HOURS);
        clock.advance(Duration::from_secs(10 * 3600 + 15 * 60)); // 00:00:30 next day
        let midnight = read(&mut rtc, REG_HOURS);

        assert_eq!(afternoon, HOUR_PM | 0x01);
        assert_eq!(midnight, 0x12);
    }

    #[test]
    fn register_a_and_d_defaults() {
        let (mut rtc, _) = rtc_at(SUNDAY_AFTERNOON);

        assert_eq!(read(&mut rtc, REG_A), 0x26);
        assert_eq!(read(&mut rtc, REG_B), 0x02);
        assert_eq!(read(&mut rtc, REG_D), 0x80);
    }

    #[test]
    fn register_c_reports_update_then_clears_on_read() {
        let (mut rtc, clock) = rtc_at(SUNDAY_AFTERNOON);
        clock.advance(Duration::from_secs(1));

        let first = read(&mut rtc, REG_C);
        let second = read(&mut rtc, REG_C);

        assert_eq!(first, REG_C_UPDATE_ENDED);
        assert_eq!(second, 0);
    }

    #[test]
    fn setting_time_moves_offset_and_clock_keeps_running() {
        let (mut rtc, clock) = rtc_at(SUNDAY_AFTERNOON);

        write(&mut rtc, REG_B, REG_B_SET | REG_B_24_HOUR);
        write(&mut rtc, REG_YEAR, 0x31);
        write(&mut rtc, REG_MONTH, 0x02);
        write(&mut rtc, REG_DAY_OF_MONTH, 0x28);
        write(&mut rtc, REG_HOURS, 0x23);
        write(&mut rtc, REG_MINUTES, 0x59);
        write(&mut rtc, REG_SECONDS, 0x58);
        write(&mut rtc, REG_B, REG_B_24_HOUR);
        clock.advance(Duration::from_secs(3));

        // 2031-02-28 23:59:58 plus 3 s is 2031-03-01 00:00:01, a Saturday.
        assert_eq!(
            read_time(&mut rtc),
            [0x20, 0x31, 0x03, 0x01, 0x07, 0x00, 0x00, 0x01]
        );
        assert_eq!(rtc.offset_secs, 1_930_089_598 - SUNDAY_AFTERNOON as i64);
    }

    #[test]
    fn time_is_frozen_while_set_is_on() {
        let (mut rtc, clock) = rtc_at(SUNDAY_AFTERNOON);

        write(&mut rtc, REG_B, REG_B_SET | REG_B_24_HOUR);
        clock.advance(Duration::from_secs(5));

        assert_eq!(read(&mut rtc, REG_SECONDS), 0x30);
    }

    #[test]
    fn invalid_date_is_not_committed() {
        let (mut rtc, _) = rtc_at(SUNDAY_AFTERNOON);

        write(&mut rtc, REG_B, REG_B_SET | REG_B_24_HOUR);
        write(&mut rtc, REG_MONTH, 0x02);
        write(&mut rtc, REG_DAY_OF_MONTH, 0x30);
        write(&mut rtc, REG_B, REG_B_24_HOUR);

        assert_eq!(rtc.offset_secs, 0);
        assert_eq!(read(&mut rtc, REG_MONTH), 0x11);
    }

    #[test]
    fn malformed_bcd_and_twelve_hour_writes_are_ignored() {
        let (mut rtc, _) = rtc_at(SUNDAY_AFTERNOON);

        write(&mut rtc, REG_MINUTES, 0x5f);
        write(&mut rtc, REG_B, 0);
        write(&mut rtc, REG_HOURS, 0x13);

        assert_eq!(rtc.offset_secs, 0);
    }

    #[test]
    fn twelve_hour_write_converts_pm() {
        let (mut rtc, _) = rtc_at(SUNDAY_AFTERNOON);

        write(&mut rtc, REG_B, REG_B_BINARY);
        write(&mut rtc, REG_HOURS, HOUR_PM | 12);
        write(&mut rtc, REG_B, REG_B_BINARY | REG_B_24_HOUR);

        assert_eq!(read(&mut rtc, REG_HOURS), 12);
        assert_eq!(rtc.offset_secs, -3600);
    }

    #[test]
    fn nmi_bit_is_masked_from_index() {
        let (mut rtc, _) = rtc_at(SUNDAY_AFTERNOON);

        let minutes = read(&mut rtc, 0x80 | REG_MINUTES);

        assert_eq!(minutes, 0x45);
    }

    #[test]
    fn cmos_bytes_and_alarms_are_storage() {
        let (mut rtc, _) = rtc_at(SUNDAY_AFTERNOON);

        write(&mut rtc, 0x7f, 0xa5);
        write(&mut rtc, REG_HOURS_ALARM, 0x07);
        write(&mut rtc, REG_SECONDS_ALARM, 0x01);
        write(&mut rtc, REG_MINUTES_ALARM, 0x02);

        assert_eq!(read(&mut rtc, 0x7f), 0xa5);
        assert_eq!(read(&mut rtc, REG_HOURS_ALARM), 0x07);
        assert_eq!(read(&mut rtc, REG_SECONDS_ALARM), 0x01);
        assert_eq!(read(&mut rtc, REG_MINUTES_ALARM), 0x02);
        assert_eq!(read(&mut rtc, 0x0e), 0);
    }

    #[test]
    fn memory_size_fills_firmware_bytes() {
        let (mut rtc, _) = rtc_at(SUNDAY_AFTERNOON);

        rtc.set_memory_size(3 << 30, 5 << 30);

        assert_eq!([read(&mut rtc, 0x15), read(&mut rtc, 0x16)], [0x80, 0x02]);
        // Extended memory above 1 MiB saturates at 0xffff KiB.
        assert_eq!([read(&mut rtc, 0x30), read(&mut rtc, 0x31)], [0xff, 0xff]);
        assert_eq!([read(&mut rtc, 0x17), read(&mut rtc, 0x18)], [0xff, 0xff]);
        // (3 GiB - 16 MiB) / 64 KiB = 0xbf00.
        assert_eq!([read(&mut rtc, 0x34), read(&mut rtc, 0x35)], [0x00, 0xbf]);
        // 5 GiB / 64 KiB = 0x01_4000.
        let above = [0x5b, 0x5c, 0x5d].map(|i| read(&mut rtc, i));
        assert_eq!(above, [0x00, 0x40, 0x01]);
    }

    #[test]
    fn memory_size_small_guest() {
        let (mut rtc, _) = rtc_at(SUNDAY_AFTERNOON);

        rtc.set_memory_size(8 << 20, 0);

        // 7 MiB above 1 MiB = 7168 KiB = 0x1c00.
        assert_eq!([read(&mut rtc, 0x30), read(&mut rtc, 0x31)], [0x00, 0x1c]);
        assert_eq!([read(&mut rtc, 0x34), read(&mut rtc, 0x35)], [0, 0]);
    }

    #[test]
    fn calendar_round_trips_across_leap_days_and_centuries() {
        let samples = [0i64, 951_782_400, 1_795_355_130, -86_400, 4_107_542_400];

        for secs in samples {
            let time = DateTime::from_unix(secs);
            assert_eq!(time.to_unix(), Some(secs), "{time:?}");
        }
        assert_eq!(
            DateTime::from_unix(951_782_400),
            DateTime {
                year: 2000,
                month: 2,
                day: 29,
                hour: 0,
                minute: 0,
                second: 0
            }
        );
        assert_eq!(
            DateTime::from_unix(0).day_of_week(),
            5,
            "1970-01-01 was a Thursday"
        );
    }

    #[test]
    fn wide_accesses_are_ignored() {
        let (mut rtc, _) = rtc_at(SUNDAY_AFTERNOON);
        let mut data = [0u8; 2];

        rtc.write(BASE, INDEX_OFFSET, &[REG_B, 0]);
        rtc.read(BASE, INDEX_OFFSET, &mut data);

        assert_eq!(data, [0xff, 0xff]);
        assert_eq!(rtc.index, 0);
    }

    #[test]
    fn random_accesses_do_not_panic() {
        let (mut rtc, clock) = rtc_at(SUNDAY_AFTERNOON);

        fuzz_device(&mut rtc, BASE, RTC_PORT_LEN.into(), 50_000);
        clock.set(Duration::from_secs(u64::MAX));
        fuzz_device(&mut rtc, BASE, RTC_PORT_LEN.into(), 5_000);
    }

    #[test]
    fn a_restored_rtc_keeps_the_guests_time_offset_cmos_and_mode() {
        let (mut rtc, _) = rtc_at(SUNDAY_AFTERNOON);
        write(&mut rtc, REG_B, REG_B_SET | REG_B_24_HOUR | REG_B_BINARY);
        write(&mut rtc, REG_YEAR, 30);
        write(&mut rtc, REG_B, REG_B_24_HOUR | REG_B_BINARY);
        write(&mut rtc, 0x40, 0x99);
        let before = read_time(&mut rtc);
        let saved = rtc.save_registers();
        let (mut fresh, _) = rtc_at(SUNDAY_AFTERNOON);

        fresh.restore_registers(&saved).unwrap();
        let restored = fresh.save_registers();

        assert_eq!(restored, saved);
        assert_eq!(read_time(&mut fresh), before);
        assert_eq!(read(&mut fresh, REG_YEAR), 30);
        assert_eq!(read(&mut fresh, 0x40), 0x99);
    }

    #[test]
    fn a_saved_cmos_of_the_wrong_size_is_refused() {
        let (mut rtc, _) = rtc_at(SUNDAY_AFTERNOON);
        let saved = RtcRegisters {
            cmos: vec![0; CMOS_SIZE + 1],
            ..rtc.save_registers()
        };

        let refused = rtc.restore_registers(&saved);

        assert!(refused.is_err());
    }
}
