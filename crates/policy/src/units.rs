//! The policy's small languages: durations (`1h30m`), rates (`5MB/s`) and daily windows
//! (`01:00-05:00`, UTC). Each parses into an exact integer form and prints back canonically, so
//! `90s` and `1m30s` name the same policy.

use std::fmt;

/// A duration in milliseconds, written as a sequence of `<integer><unit>` with units `ms`, `s`,
/// `m`, `h` and `d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Dur(pub u64);

impl Dur {
    /// About 100 years: longer than any budget or retention anyone means.
    pub const MAX_MS: u64 = 100 * 365 * 86_400_000;

    pub fn ms(self) -> u64 {
        self.0
    }

    pub fn parse(s: &str) -> Result<Dur, String> {
        const UNITS: [(&str, u64); 5] = [("ms", 1), ("s", 1_000), ("m", 60_000), ("h", 3_600_000), ("d", 86_400_000)];
        let s = s.trim();
        if s.is_empty() {
            return Err("empty duration".into());
        }
        let mut rest = s;
        let mut total: u64 = 0;
        let mut last_unit = u64::MAX;
        while !rest.is_empty() {
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            if digits == 0 {
                return Err(format!("expected a number at {rest:?}"));
            }
            let n: u64 = rest[..digits].parse().map_err(|_| "number too large".to_string())?;
            rest = &rest[digits..];
            let letters = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
            let unit = &rest[..letters];
            let Some(&(_, factor)) = UNITS.iter().find(|(u, _)| *u == unit) else {
                return Err(if unit.is_empty() {
                    format!("{n} has no unit")
                } else {
                    format!("unknown unit {unit:?}")
                });
            };
            if factor >= last_unit {
                return Err("units must go from largest to smallest, each once".into());
            }
            last_unit = factor;
            rest = &rest[letters..];
            total = n.checked_mul(factor).and_then(|v| total.checked_add(v)).ok_or("duration too long")?;
        }
        if total > Self::MAX_MS {
            return Err("longer than 100 years".into());
        }
        Ok(Dur(total))
    }
}

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 == 0 {
            return f.write_str("0s");
        }
        let mut rest = self.0;
        for (unit, factor) in [("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1_000), ("ms", 1)] {
            if rest >= factor {
                write!(f, "{}{unit}", rest / factor)?;
                rest %= factor;
            }
        }
        Ok(())
    }
}

/// A rate in bytes per second, written `<number><unit>/s` with units `B`, `KB`, `MB`, `GB`
/// (powers of 1000) or `KiB`, `MiB`, `GiB` (powers of 1024); up to three decimals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rate(pub u64);

const RATE_UNITS: [(&str, u64); 7] = [
    ("GB", 1_000_000_000),
    ("MB", 1_000_000),
    ("KB", 1_000),
    ("GiB", 1 << 30),
    ("MiB", 1 << 20),
    ("KiB", 1 << 10),
    ("B", 1),
];

impl Rate {
    /// 100 GB/s: beyond any link a policy could describe.
    pub const MAX_BYTES_PER_SEC: u64 = 100_000_000_000;

    pub fn bytes_per_sec(self) -> u64 {
        self.0
    }

    pub fn parse(s: &str) -> Result<Rate, String> {
        let s = s.trim();
        let Some(amount) = s.strip_suffix("/s") else {
            return Err("a rate ends in /s, as in 5MB/s".into());
        };
        let number_len = amount.bytes().take_while(|b| b.is_ascii_digit() || *b == b'.').count();
        let (number, unit) = amount.split_at(number_len);
        let Some(&(_, factor)) = RATE_UNITS.iter().find(|(u, _)| *u == unit) else {
            return Err(format!("unknown unit {unit:?}; use B, KB, MB, GB, KiB, MiB or GiB"));
        };
        let (whole, frac) = number.split_once('.').unwrap_or((number, ""));
        if whole.is_empty() || frac.len() > 3 || !frac.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("{number:?} is not a number with at most three decimals"));
        }
        let whole: u64 = whole.parse().map_err(|_| "number too large".to_string())?;
        let frac_value: u64 = if frac.is_empty() { 0 } else { frac.parse().unwrap_or(0) };
        let frac_scale = 10u64.pow(frac.len() as u32);
        if !(frac_value * factor).is_multiple_of(frac_scale) {
            return Err(format!("{number}{unit}/s is not a whole number of bytes per second"));
        }
        let bytes = whole
            .checked_mul(factor)
            .and_then(|w| w.checked_add(frac_value * factor / frac_scale))
            .ok_or("rate too large")?;
        if bytes == 0 {
            return Err("a rate must be at least 1B/s".into());
        }
        if bytes > Self::MAX_BYTES_PER_SEC {
            return Err("faster than 100GB/s".into());
        }
        Ok(Rate(bytes))
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (unit, factor) =
            RATE_UNITS.iter().find(|(_, factor)| self.0.is_multiple_of(*factor)).copied().unwrap_or(("B", 1));
        write!(f, "{}{unit}/s", self.0 / factor)
    }
}

/// A daily window in UTC, `HH:MM-HH:MM`; it may wrap past midnight (`22:00-02:00`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Window {
    pub start_minute: u16,
    pub end_minute: u16,
}

impl Window {
    pub const MINUTES_PER_DAY: u16 = 1440;

    pub fn parse(s: &str) -> Result<Window, String> {
        fn minute(t: &str) -> Result<u16, String> {
            let (h, m) = t.trim().split_once(':').ok_or_else(|| format!("{t:?} is not HH:MM"))?;
            let ok = |p: &str| p.len() == 2 && p.bytes().all(|b| b.is_ascii_digit());
            if !ok(h) || !ok(m) {
                return Err(format!("{t:?} is not HH:MM"));
            }
            let (h, m): (u16, u16) = (h.parse().unwrap_or(99), m.parse().unwrap_or(99));
            if h > 23 || m > 59 {
                return Err(format!("{t:?} is not a time of day"));
            }
            Ok(h * 60 + m)
        }
        let (a, b) = s.split_once('-').ok_or("a window is HH:MM-HH:MM (UTC)")?;
        let w = Window { start_minute: minute(a)?, end_minute: minute(b)? };
        if w.start_minute == w.end_minute {
            return Err("the window is empty; for all day, use mode = \"continuous\"".into());
        }
        Ok(w)
    }

    pub fn length_minutes(self) -> u16 {
        (self.end_minute + Self::MINUTES_PER_DAY - self.start_minute) % Self::MINUTES_PER_DAY
    }

    /// Whether `minute_of_day` (0..1440, UTC) falls inside the window.
    pub fn contains(self, minute_of_day: u16) -> bool {
        (minute_of_day + Self::MINUTES_PER_DAY - self.start_minute) % Self::MINUTES_PER_DAY < self.length_minutes()
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hm = |m: u16| format!("{:02}:{:02}", m / 60, m % 60);
        write!(f, "{}-{}", hm(self.start_minute), hm(self.end_minute))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn durations() {
        assert_eq!(Dur::parse("1h30m").unwrap(), Dur(5_400_000));
        assert_eq!(Dur::parse("90s").unwrap().to_string(), "1m30s");
        assert_eq!(Dur::parse("400d").unwrap().to_string(), "400d");
        assert_eq!(Dur::parse("250ms").unwrap(), Dur(250));
        for bad in ["", "5", "s", "1x", "1m1h", "1s1s", "1.5s", "-1s", "99999999999999999999s", "40000d"] {
            assert!(Dur::parse(bad).is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn rates() {
        assert_eq!(Rate::parse("5MB/s").unwrap(), Rate(5_000_000));
        assert_eq!(Rate::parse("1.5KiB/s").unwrap(), Rate(1536));
        assert_eq!(Rate::parse("1MiB/s").unwrap().to_string(), "1MiB/s");
        assert_eq!(Rate::parse("2000KB/s").unwrap().to_string(), "2MB/s");
        for bad in ["5MB", "5mb/s", "MB/s", "0B/s", "1.2345MB/s", "101GB/s", "5 MB/s", "1.5B/s", "1.001KiB/s"] {
            assert!(Rate::parse(bad).is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn windows() {
        let w = Window::parse("22:00-02:00").unwrap();
        assert_eq!(w.length_minutes(), 240);
        assert!(w.contains(23 * 60) && w.contains(60) && !w.contains(2 * 60) && !w.contains(12 * 60));
        assert_eq!(w.to_string(), "22:00-02:00");
        for bad in ["01:00", "1:00-02:00", "24:00-01:00", "01:00-01:00", "01:60-02:00"] {
            assert!(Window::parse(bad).is_err(), "{bad:?} should not parse");
        }
    }

    proptest! {
        #[test]
        fn durations_print_back_to_themselves(ms in 0u64..Dur::MAX_MS) {
            prop_assert_eq!(Dur::parse(&Dur(ms).to_string()).unwrap(), Dur(ms));
        }

        #[test]
        fn rates_print_back_to_themselves(b in 1u64..Rate::MAX_BYTES_PER_SEC) {
            prop_assert_eq!(Rate::parse(&Rate(b).to_string()).unwrap(), Rate(b));
        }
    }
}
