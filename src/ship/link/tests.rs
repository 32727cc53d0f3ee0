use super::*;

/// 2026-12-06T00:00:00Z.
const DEC_6: i64 = 1_796_515_200;
const DAY: i64 = 86_400;
const HOUR: i64 = 3_600;

fn cfg(daily: Option<u64>, monthly: Option<u64>) -> LinkConfig {
    LinkConfig {
        max_bandwidth: None,
        daily_budget: daily,
        monthly_budget: monthly,
        utc_offset: 0,
        monthly_reset_day: 1,
        top_priority: 9,
    }
}

#[test]
fn dates_convert_both_ways() {
    for (days, date) in [
        (0, (1970, 1, 1)),
        (-1, (1969, 12, 31)),
        (11_017, (2000, 3, 1)),
        (19_782, (2024, 2, 29)),
        (20_793, (2026, 12, 6)),
    ] {
        assert_eq!(civil_from_days(days), date, "{days}");
        assert_eq!(days_from_civil(date.0, date.1, date.2), days, "{date:?}");
    }
    for z in -800_000..800_000 {
        if z % 997 == 0 {
            let (y, m, d) = civil_from_days(z);
            assert_eq!(days_from_civil(y, m, d), z);
        }
    }
}

#[test]
fn days_begin_at_local_midnight() {
    assert_eq!(day_start(DEC_6, 0), DEC_6);
    assert_eq!(day_start(DEC_6 + DAY - 1, 0), DEC_6);
    assert_eq!(next_day_start(DEC_6 + 5, 0), DEC_6 + DAY);
    // UTC+02:00: the local day began at 22:00 UTC the evening before.
    let east = 2 * 3_600;
    assert_eq!(day_start(DEC_6 + HOUR, east), DEC_6 - 2 * HOUR);
    assert_eq!(day_start(DEC_6 + 22 * HOUR, east), DEC_6 + 22 * HOUR);
    // UTC-05:00: still the 5th there until 05:00 UTC.
    let west = -5 * 3_600;
    assert_eq!(day_start(DEC_6 + 4 * HOUR, west), DEC_6 - 19 * HOUR);
    assert_eq!(day_start(DEC_6 + 5 * HOUR, west), DEC_6 + 5 * HOUR);
}

#[test]
fn months_begin_on_the_reset_day() {
    let dec_1 = DEC_6 - 5 * DAY;
    assert_eq!(month_start(DEC_6, 0, 1), dec_1);
    assert_eq!(next_month_start(DEC_6, 0, 1), 1_798_761_600); // 2027-01-01
                                                              // A billing cycle from the 15th: on Dec 6 it began on Nov 15.
    let nov_15 = dec_1 - 16 * DAY;
    assert_eq!(month_start(DEC_6, 0, 15), nov_15);
    assert_eq!(next_month_start(DEC_6, 0, 15), 1_797_292_800); // 2026-12-15
    assert_eq!(month_start(1_797_292_800, 0, 15), 1_797_292_800);
    assert_eq!(month_start(1_797_292_800 - 1, 0, 15), nov_15);
    // Across the year: Jan 3 with a cycle from the 15th began Dec 15.
    let jan_3 = 1_798_761_600 + 2 * DAY;
    assert_eq!(month_start(jan_3, 0, 15), 1_797_292_800);
    assert_eq!(next_month_start(jan_3, 0, 15), 1_798_761_600 + 14 * DAY);
}

#[test]
fn usage_starts_again_with_each_period() {
    let c = cfg(Some(1_000), Some(10_000));
    let mut u = Usage::default();
    u.roll(DEC_6 + HOUR, &c);
    u.add(600);
    u.roll(DEC_6 + 23 * HOUR, &c);
    u.add(300);
    assert_eq!((u.day_bytes, u.month_bytes), (900, 900));
    // Midnight: the day starts again, the month goes on.
    u.roll(DEC_6 + DAY, &c);
    assert_eq!((u.day_bytes, u.month_bytes), (0, 900));
    u.add(50);
    // The first of the month: both start again.
    u.roll(1_798_761_600, &c);
    assert_eq!((u.day_bytes, u.month_bytes), (0, 0));
}

#[test]
fn a_spent_budget_stops_until_its_period_ends() {
    let c = cfg(Some(1_000), Some(10_000));
    let mut u = Usage::default();
    u.roll(DEC_6 + HOUR, &c);
    u.add(999);
    assert_eq!(spent(&u, &c, 9, DEC_6 + HOUR), None);
    u.add(1);
    let s = spent(&u, &c, 9, DEC_6 + HOUR).expect("spent");
    assert_eq!(
        s,
        Spent {
            period: Period::Day,
            resets_at: DEC_6 + DAY
        }
    );
    // The next day it may go on: the day's count starts again.
    assert_eq!(spent(&u, &c, 9, DEC_6 + DAY), None);
    // The month's budget, once spent, outlasts the day's.
    u.add(9_000);
    let s = spent(&u, &c, 9, DEC_6 + HOUR).expect("spent");
    assert_eq!(s.period, Period::Month);
    assert_eq!(s.resets_at, 1_798_761_600);
    let r = readings(&u, &c, DEC_6 + HOUR);
    assert_eq!(r.len(), 2);
    assert_eq!((r[1].used, r[1].left()), (10_000, 0));
}

#[test]
fn the_last_tenth_of_a_budget_is_kept_for_the_top_priority() {
    let mut c = cfg(Some(1_000), None);
    c.top_priority = 7;
    let mut u = Usage::default();
    u.roll(DEC_6, &c);
    u.add(899);
    assert_eq!(spent(&u, &c, 3, DEC_6), None);
    u.add(1);
    assert!(spent(&u, &c, 3, DEC_6).is_some(), "100 left: kept for 7");
    assert_eq!(spent(&u, &c, 7, DEC_6), None);
    u.add(100);
    assert!(spent(&u, &c, 7, DEC_6).is_some());
}

#[test]
fn the_bucket_holds_the_rate_without_bursts() {
    let t0 = Instant::now();
    let mut b = Bucket::new(1_000, t0);
    // A second's worth at most, in slices of a twentieth of it, or a whole
    // TCP segment when that is more (here: the whole second's worth).
    assert_eq!(b.take(10_000, t0), Ok(1_000));
    let mut sent = 1_000;
    let mut now = t0;
    let mut largest_second = 0;
    let mut this_second = 1_000;
    let mut second = 0;
    while now < t0 + Duration::from_secs(60) {
        match b.take(4_096, now) {
            Ok(n) => {
                sent += n;
                this_second += n;
            }
            Err(wait) => {
                assert!(wait > Duration::ZERO);
                now += wait;
            }
        }
        let s = now.duration_since(t0).as_secs();
        if s != second {
            largest_second = largest_second.max(this_second);
            this_second = 0;
            second = s;
        }
    }
    // 60 s at 1000 B/s, plus the one second's worth the bucket starts with.
    assert!((60_000..=61_100).contains(&sent), "{sent}");
    assert!(largest_second <= 2_050, "{largest_second} in one second");
}

#[test]
fn slices_are_whole_segments_not_what_trickled_in() {
    let t0 = Instant::now();
    let mut b = Bucket::new(16_000, t0);
    // The first second's worth goes in whole segments.
    let mut first = 0;
    while let Ok(n) = b.take(100_000, t0) {
        assert_eq!(n, 1_448);
        first += n;
    }
    assert!(first > 16_000 - 1_448, "{first}");
    // Then every grant is a whole segment, however often it is asked for:
    // asked every millisecond, the bucket answers "wait" until one is there.
    let mut now = t0;
    let mut grants = Vec::new();
    while now < t0 + Duration::from_secs(2) {
        now += Duration::from_millis(1);
        if let Ok(n) = b.take(100_000, now) {
            grants.push(n);
        }
    }
    assert!(grants.iter().all(|&n| n == 1_448), "{grants:?}");
    assert!((20..=23).contains(&grants.len()), "{} grants", grants.len());
    // The end of a body is the rest of it; a fast cap slices a twentieth.
    assert_eq!(b.take(10, now + Duration::from_secs(1)), Ok(10));
    let mut fast = Bucket::new(1_000_000, t0);
    assert_eq!(fast.take(1 << 20, t0), Ok(50_000));
}

#[test]
fn charged_bytes_delay_the_next_body() {
    let t0 = Instant::now();
    let mut b = Bucket::new(1_000, t0);
    b.charge(3_000, t0);
    let wait = b.take(100, t0).expect_err("in debt");
    assert!(wait >= Duration::from_secs(2), "{wait:?}");
    assert!(b.take(100, t0 + Duration::from_millis(2_100)).is_ok());
}

#[test]
fn usage_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let c = cfg(Some(1_000_000), None);
    let link = Link::new(c.clone(), Some(dir.path()));
    link.charge(1_234);
    assert_eq!(link.take(766, 5), 766);
    link.save(true);
    let again = Link::new(c, Some(dir.path()));
    // A body is counted with its framing; other charges as they are.
    assert_eq!(again.readings()[0].used, 1_234 + framed(766));
}

#[test]
fn a_body_is_counted_with_its_tcp_ip_framing() {
    assert_eq!(framed(0), 0);
    assert_eq!(framed(1), 2);
    assert_eq!(framed(1_448), 1_448 + 73);
    assert_eq!(framed(1_000_000), 1_050_000);
}

#[test]
fn a_higher_priority_goes_first_on_a_thin_link() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let mut c = cfg(None, None);
    c.max_bandwidth = Some(40_000);
    let link = Arc::new(Link::new(c, None));
    // Empty the bucket, so both must wait.
    link.charge(40_000);
    let got = Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]);
    let workers: Vec<_> = [(0usize, 2u8), (1, 8)]
        .into_iter()
        .map(|(i, p)| {
            let (link, got) = (link.clone(), got.clone());
            std::thread::spawn(move || {
                let until = Instant::now() + Duration::from_millis(1_500);
                while Instant::now() < until {
                    got[i].fetch_add(link.take(1_000, p), Ordering::Relaxed);
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let (low, high) = (
        got[0].load(Ordering::Relaxed),
        got[1].load(Ordering::Relaxed),
    );
    assert!(
        high > 4 * low.max(1),
        "priority 8 got {high}, priority 2 {low}"
    );
}
