//! Properties of the parsers, over generated input: whatever a user types, a parser returns
//! a value or one line naming the option, and never panics; what it accepts means what it
//! says.

use proptest::prelude::*;

use super::*;
use crate::report;

/// Any text, control characters and odd Unicode included.
fn any_text() -> impl Strategy<Value = String> {
    prop_oneof![
        ".{0,40}",
        "[0-9a-zA-Z ./*?\\[\\]:'\"\\\\\\n\\t-]{0,40}",
        any::<Vec<char>>().prop_map(|c| c.into_iter().take(40).collect()),
    ]
}

fn one_line_naming(e: &Error, option: &str) -> bool {
    let text = report::escape(&e.to_string()).into_owned();
    !text.contains('\n') && text.starts_with(option)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn durations_are_values_or_one_line(text in any_text()) {
        match duration("--grace-period", &text) {
            Ok(d) => prop_assert!(d.as_secs() <= MAX_SECONDS),
            Err(e) => prop_assert!(one_line_naming(&e, "--grace-period"), "{e}"),
        }
    }

    #[test]
    fn bare_seconds_mean_seconds(secs in 0..=MAX_SECONDS) {
        prop_assert_eq!(duration("--x", &secs.to_string()).unwrap(), Duration::from_secs(secs));
        let spelled = format!("{secs}s");
        prop_assert_eq!(duration("--x", &spelled).unwrap(), Duration::from_secs(secs));
    }

    #[test]
    fn targets_are_values_or_one_line(text in any_text()) {
        match target("--wait-pid", text.as_ref()) {
            Ok(Target::Pid(pid)) => {
                prop_assert!(pid.get() >= 1 && i32::try_from(pid.get()).is_ok());
                prop_assert_eq!(pid.to_string(), text.trim_start_matches('0'));
            }
            Ok(Target::Name(name)) => {
                prop_assert!(!name.is_empty() && !name.contains('/'));
                let control = name.chars().any(char::is_control);
                prop_assert!(!control, "{name:?}");
            }
            Ok(Target::PidFile(path)) => prop_assert!(!path.as_os_str().is_empty()),
            Ok(Target::Children(parent)) => {
                prop_assert!(!matches!(*parent, Target::Children(_)));
            }
            Err(e) => prop_assert!(one_line_naming(&e, "--wait-pid"), "{e}"),
        }
    }

    #[test]
    fn every_positive_pid_is_a_target(pid in 1..=i64::from(i32::MAX)) {
        let parsed = target("--x", pid.to_string().as_ref()).unwrap();
        prop_assert_eq!(parsed, Target::Pid(ProcessId::from_raw(pid as u32).unwrap()));
    }

    #[test]
    fn out_of_range_pids_are_refused(pid in prop_oneof![
        Just(0i64),
        (i64::from(i32::MAX) + 1)..=i64::MAX,
        i64::MIN..0,
    ]) {
        prop_assert!(target("--x", pid.to_string().as_ref()).is_err());
    }

    #[test]
    fn quoted_words_split_back_into_the_same_words(
        words in proptest::collection::vec("[^\\x00]{0,12}", 1..6)
    ) {
        // Quoted as a shell would: each word in single quotes, a quote as '\''.
        let command = words
            .iter()
            .map(|w| format!("'{}'", w.replace('\'', "'\\''")))
            .collect::<Vec<_>>()
            .join(" ");
        prop_assert_eq!(split_words(&command).unwrap(), words);
    }

    #[test]
    fn word_splitting_never_panics(text in any_text()) {
        let _ = split_words(&text);
    }

    #[test]
    fn globs_are_absolute_and_clean_or_one_line(text in any_text()) {
        match lock_glob(text.as_ref()) {
            Ok(glob) => {
                prop_assert!(glob.absolute.starts_with('/'));
                prop_assert!(!glob.absolute.contains("//"));
                prop_assert!(!glob.absolute.ends_with('/'));
                prop_assert!(!glob.absolute.chars().any(char::is_control));
            }
            Err(e) => prop_assert!(one_line_naming(&e, "--wait-lock"), "{e}"),
        }
    }

    #[test]
    fn signals_are_values_or_one_line(text in any_text()) {
        if let Err(e) = signal("--signal", &text) {
            prop_assert!(one_line_naming(&e, "--signal"), "{e}");
        }
    }

    #[test]
    fn text_output_is_one_line_whatever_it_carries(text in any_text()) {
        let line = report::Record::info("x", text.clone()).text();
        prop_assert_eq!(line.matches('\n').count(), 1);
        prop_assert!(!line.trim_end_matches('\n').chars().any(char::is_control));
        let json = report::Record::info("x", text.clone()).json();
        prop_assert_eq!(report::read_json(&json).unwrap().message, text);
    }
}
