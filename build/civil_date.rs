// The calendar date of a Unix time, in pure integer arithmetic (Howard Hinnant's `civil_from_days`,
// http://howardhinnant.github.io/date_algorithms.html): the build script stamps the build date
// without a date library or the `date` command. Included by `build.rs` and by the tests.

/// `YYYY-MM-DD` (UTC) of `secs` seconds since 1970-01-01T00:00:00Z.
pub fn civil_date(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    // Shift the epoch to 0000-03-01, so that a leap day is the last day of its year.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153; // 0 = March
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}
