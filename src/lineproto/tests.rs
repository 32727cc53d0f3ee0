use super::*;
use proptest::prelude::*;
use ParseErrorKind::*;

const NOW: i64 = 1_700_000_000_123_456_789;

fn norm(body: &[u8], precision: Precision) -> (String, Summary) {
    let mut out = Vec::new();
    let summary = normalize(body, precision, NOW, &mut out);
    (
        String::from_utf8(out).expect("test output is UTF-8"),
        summary,
    )
}

#[test]
fn precision_names_and_multipliers() {
    use Precision::*;
    for (s, p) in [
        ("ns", Nanoseconds),
        ("us", Microseconds),
        ("ms", Milliseconds),
    ] {
        assert_eq!(Precision::from_v2(s), Some(p));
        assert_eq!(Precision::from_v1(s), Some(p));
    }
    assert_eq!(Precision::from_v2("s"), Some(Seconds));
    for bad in ["", "n", "u", "m", "h", "NS", "sec", "µs"] {
        assert_eq!(Precision::from_v2(bad), None, "{bad}");
    }
    for (s, p) in [
        ("n", Nanoseconds),
        ("u", Microseconds),
        ("s", Seconds),
        ("m", Minutes),
        ("h", Hours),
    ] {
        assert_eq!(Precision::from_v1(s), Some(p));
    }
    for bad in ["", "mm", "H", "rfc3339", "d"] {
        assert_eq!(Precision::from_v1(bad), None, "{bad}");
    }
    let mults: Vec<i64> = [
        Nanoseconds,
        Microseconds,
        Milliseconds,
        Seconds,
        Minutes,
        Hours,
    ]
    .iter()
    .map(|p| p.multiplier())
    .collect();
    assert_eq!(
        mults,
        [
            1,
            1_000,
            1_000_000,
            1_000_000_000,
            60_000_000_000,
            3_600_000_000_000
        ]
    );
    assert_eq!(Seconds.to_nanos(-2), Some(-2_000_000_000));
    assert_eq!(Nanoseconds.to_nanos(i64::MAX), None);
    assert_eq!(Nanoseconds.to_nanos(i64::MIN + 1), None);
    assert_eq!(
        Nanoseconds.to_nanos(MIN_TIMESTAMP_NS),
        Some(MIN_TIMESTAMP_NS)
    );
    assert_eq!(Hours.to_nanos(2_562_048), None);
    assert_eq!(
        Hours.to_nanos(2_562_047),
        Some(2_562_047 * 3_600_000_000_000)
    );
}

/// (body, precision, expected output); every body here is entirely valid.
const VALID: &[(&str, Precision, &str)] = {
    use Precision::*;
    &[
        ("cpu value=1 1600000000000000000", Nanoseconds, "cpu value=1 1600000000000000000\n"),
        ("cpu value=1 1600000000000000000\n", Nanoseconds, "cpu value=1 1600000000000000000\n"),
        ("cpu value=1", Nanoseconds, "cpu value=1 1700000000123456789\n"),
        ("cpu value=1\n", Seconds, "cpu value=1 1700000000123456789\n"),
        (
            "cpu,host=a,region=b usage=0.5,count=3i,total=10u,ok=true,msg=\"hi\" 1",
            Nanoseconds,
            "cpu,host=a,region=b usage=0.5,count=3i,total=10u,ok=true,msg=\"hi\" 1\n",
        ),
        // Escapes in every position.
        (
            r#"c\,p\ u,ho\,s\ t\=k=v\,a\ l\=ue f\,i\ e\=ld=1,s="a \"q\" \\ b, c=d e" 5"#,
            Nanoseconds,
            "c\\,p\\ u,ho\\,s\\ t\\=k=v\\,a\\ l\\=ue f\\,i\\ e\\=ld=1,s=\"a \\\"q\\\" \\\\ b, c=d e\" 5\n",
        ),
        // Literal backslashes and odd but legal bytes in names.
        (r"c\pu,t\ag=v\al v\x=1 1", Nanoseconds, "c\\pu,t\\ag=v\\al v\\x=1 1\n"),
        ("\"cpu\"=x,\"k\"=\"v\" \"f\"=1 2", Nanoseconds, "\"cpu\"=x,\"k\"=\"v\" \"f\"=1 2\n"),
        ("cpu\tload v=1 3", Nanoseconds, "cpu\tload v=1 3\n"),
        ("温度,地点=東京 値=1.5 4", Nanoseconds, "温度,地点=東京 値=1.5 4\n"),
        (r"\#cpu v=1 5", Nanoseconds, "\\#cpu v=1 5\n"),
        // Every precision.
        ("cpu v=1 5", Microseconds, "cpu v=1 5000\n"),
        ("cpu v=1 5", Milliseconds, "cpu v=1 5000000\n"),
        ("cpu v=1 5", Seconds, "cpu v=1 5000000000\n"),
        ("cpu v=1 5", Minutes, "cpu v=1 300000000000\n"),
        ("cpu v=1 5", Hours, "cpu v=1 18000000000000\n"),
        // Negative, zero, non-canonical and extreme timestamps.
        ("cpu v=1 -5", Seconds, "cpu v=1 -5000000000\n"),
        ("cpu v=1 -5", Nanoseconds, "cpu v=1 -5\n"),
        ("cpu v=1 0", Nanoseconds, "cpu v=1 0\n"),
        ("cpu v=1 -0", Nanoseconds, "cpu v=1 0\n"),
        ("cpu v=1 007", Nanoseconds, "cpu v=1 7\n"),
        ("cpu v=1 9223372036854775806", Nanoseconds, "cpu v=1 9223372036854775806\n"),
        ("cpu v=1 -9223372036854775806", Nanoseconds, "cpu v=1 -9223372036854775806\n"),
        ("cpu v=1 9223372036", Seconds, "cpu v=1 9223372036000000000\n"),
        // CRLF and whitespace.
        ("cpu v=1 1\r\ncpu v=2\r\n", Nanoseconds, "cpu v=1 1\ncpu v=2 1700000000123456789\n"),
        ("  \tcpu v=1   \t 2 \t \r", Nanoseconds, "cpu v=1 2\n"),
        ("cpu   \t v=1  2", Nanoseconds, "cpu   \t v=1 2\n"),
        ("cpu,t=1  v=1 \t", Milliseconds, "cpu,t=1  v=1 1700000000123456789\n"),
        // Comments and blank lines are skipped.
        (
            "# comment\n\n   \n\t# indented\r\n\r\ncpu v=1 3\n#last",
            Nanoseconds,
            "cpu v=1 3\n",
        ),
        ("", Nanoseconds, ""),
        ("\n\n", Nanoseconds, ""),
        // Every field type and spelling.
        (
            "m a=1.,b=.5,c=-1.5e-3,d=1E+10,e=-0,f=007,g=1e-400,h=-.5e3 1",
            Nanoseconds,
            "m a=1.,b=.5,c=-1.5e-3,d=1E+10,e=-0,f=007,g=1e-400,h=-.5e3 1\n",
        ),
        (
            "m a=-9223372036854775808i,b=9223372036854775807i,c=18446744073709551615u,d=0u,e=-0i 1",
            Nanoseconds,
            "m a=-9223372036854775808i,b=9223372036854775807i,c=18446744073709551615u,d=0u,e=-0i 1\n",
        ),
        (
            "m a=t,b=T,c=true,d=True,e=TRUE,f=f,g=F,h=false,i=False,j=FALSE 1",
            Nanoseconds,
            "m a=t,b=T,c=true,d=True,e=TRUE,f=f,g=F,h=false,i=False,j=FALSE 1\n",
        ),
        ("m s=\"\",t=\"a b\" 1", Nanoseconds, "m s=\"\",t=\"a b\" 1\n"),
        ("m s=\"\\n\\t\\x\" 1", Nanoseconds, "m s=\"\\n\\t\\x\" 1\n"),
        // Unsorted tags are fine.
        ("m,b=1,a=2,c=3 v=1 1", Nanoseconds, "m,b=1,a=2,c=3 v=1 1\n"),
        // Several lines, last without newline.
        ("a v=1 1\nb v=2\nc v=3 3", Seconds, "a v=1 1000000000\nb v=2 1700000000123456789\nc v=3 3000000000\n"),
    ]
};

#[test]
fn valid_bodies_normalize_to_expected_bytes() {
    for (body, precision, expected) in VALID {
        let (out, summary) = norm(body.as_bytes(), *precision);
        assert_eq!(summary.errors, vec![], "{body:?}");
        assert_eq!(summary.error_count, 0, "{body:?}");
        assert_eq!(out, *expected, "{body:?} at {precision:?}");
        assert_eq!(summary.lines as usize, expected.lines().count(), "{body:?}");
    }
}

/// (line, expected kind, expected column) for lines that must be rejected.
const INVALID: &[(&str, ParseErrorKind, usize)] = &[
    (",host=a v=1", MissingMeasurement, 1),
    ("  ,v=1", MissingMeasurement, 3),
    ("cpu", MissingFields, 4),
    ("cpu ", MissingFields, 4),
    ("cpu,host=a", MissingFields, 11),
    (r"cpu\ v=1", MissingFields, 9),
    // InfluxDB decides escaping by the previous byte: this space is escaped too.
    (r"cpu\\ v=1", MissingFields, 10),
    ("cpu,=a v=1", MissingTagKey, 5),
    ("cpu, v=1", MissingTagKey, 5),
    ("cpu,a=1, v=1", MissingTagKey, 9),
    ("cpu,host v=1", InvalidTagFormat, 9),
    ("cpu,host,a=b v=1", InvalidTagFormat, 9),
    ("cpu,host= v=1", MissingTagValue, 10),
    ("cpu,host=,a=b v=1", MissingTagValue, 10),
    ("cpu,host=a=b v=1", InvalidTagFormat, 11),
    ("cpu,host==b v=1", InvalidTagFormat, 10),
    ("cpu,host=a,host=b v=1", DuplicateTagKey, 12),
    ("cpu,b=1,a=2,b=3 v=1", DuplicateTagKey, 13),
    ("cpu =1", MissingFieldKey, 5),
    ("cpu v=1,=2", MissingFieldKey, 9),
    ("cpu v=1,", MissingFieldKey, 9),
    ("cpu v=1, w=2", MissingFieldKey, 9),
    ("cpu v", InvalidFieldFormat, 6),
    ("cpu v=1,w", InvalidFieldFormat, 10),
    ("cpu v=1,w x=1", InvalidFieldFormat, 10),
    (r"cpu v\=1", InvalidFieldFormat, 9),
    ("cpu v=", MissingFieldValue, 7),
    ("cpu v=,w=1", MissingFieldValue, 7),
    ("cpu v= 1", MissingFieldValue, 7),
    ("cpu v=1.2.3", InvalidNumber, 10),
    ("cpu v=1a", InvalidNumber, 8),
    ("cpu v=-", InvalidNumber, 7),
    ("cpu v=.", InvalidNumber, 7),
    ("cpu v=+1", InvalidNumber, 7),
    ("cpu v=NaN", InvalidNumber, 7),
    ("cpu v=nan", InvalidNumber, 7),
    ("cpu v=inf", InvalidNumber, 7),
    ("cpu v=-Inf", InvalidNumber, 7),
    ("cpu v=1e", InvalidNumber, 9),
    ("cpu v=1e+", InvalidNumber, 10),
    ("cpu v=e5", InvalidBoolean, 7),
    ("cpu v=1.5i", InvalidNumber, 10),
    ("cpu v=1e5i", InvalidNumber, 10),
    ("cpu v=1i2", InvalidNumber, 9),
    ("cpu v=i", InvalidNumber, 7),
    ("cpu v=-1u", InvalidNumber, 7),
    ("cpu v=1iu", InvalidNumber, 9),
    ("cpu v=1\t2", InvalidNumber, 8),
    ("cpu v=1_000", InvalidNumber, 8),
    ("cpu v=0x10", InvalidNumber, 8),
    ("cpu v=9223372036854775808i", IntegerOutOfRange, 7),
    ("cpu v=-9223372036854775809i", IntegerOutOfRange, 7),
    ("cpu v=99999999999999999999999i", IntegerOutOfRange, 7),
    ("cpu v=18446744073709551616u", UnsignedOutOfRange, 7),
    ("cpu v=1e309", FloatOutOfRange, 7),
    ("cpu v=-1.8e308", FloatOutOfRange, 7),
    ("cpu v=tru", InvalidBoolean, 7),
    ("cpu v=yes", InvalidBoolean, 7),
    ("cpu v=tRUE", InvalidBoolean, 7),
    ("cpu v=truee", InvalidBoolean, 7),
    ("cpu v=abc", InvalidBoolean, 7),
    ("cpu v=\"abc", UnterminatedString, 7),
    ("cpu v=\"abc\\\"", UnterminatedString, 7),
    ("cpu v=\"abc\\", UnterminatedString, 7),
    ("cpu v=\"a\"b\"", UnescapedQuote, 9),
    ("cpu v=\"a\"1", UnescapedQuote, 9),
    ("cpu v=1 12a", InvalidTimestamp, 11),
    ("cpu v=1 -", InvalidTimestamp, 9),
    ("cpu v=1 1.5", InvalidTimestamp, 10),
    ("cpu v=1 +5", InvalidTimestamp, 9),
    ("cpu v=1 1e9", InvalidTimestamp, 10),
    ("cpu v=1 9223372036854775807", TimestampOutOfRange, 9),
    ("cpu v=1 -9223372036854775807", TimestampOutOfRange, 9),
    ("cpu v=1 -9223372036854775808", TimestampOutOfRange, 9),
    ("cpu v=1 99999999999999999999", TimestampOutOfRange, 9),
    ("cpu v=1 1 2", TrailingData, 11),
    ("cpu v=1 1\t\tx", TrailingData, 12),
];

#[test]
fn lines_that_are_not_utf8_are_rejected_where_the_bad_byte_is() {
    let cases: &[(&[u8], usize)] = &[
        (b"m\xff v=1 1", 2),
        (b"m,t=\xc3\x28 v=1 1", 5),
        (b"m s=\"caf\xc3\" 1", 9),
        (b"  m v=1 1\xed\xa0\x80", 10),
        (b"m s=\"\xf0\x9f\x98\" 1", 6),
    ];
    for (line, column) in cases {
        let body = [
            b"good v=1 1\n".as_slice(),
            line,
            b"\n# \xff comment\ngood v=2 2\n",
        ]
        .concat();
        let (out, summary) = norm(&body, Precision::Nanoseconds);
        assert_eq!(out, "good v=1 1\ngood v=2 2\n", "{line:?}");
        assert_eq!(summary.error_count, 1, "{line:?}");
        assert_eq!(summary.errors[0].line, 2);
        assert_eq!(
            summary.errors[0].error,
            ParseError {
                kind: InvalidUtf8,
                column: *column
            },
            "{line:?}"
        );
        assert_eq!(parse_line(line).unwrap_err().kind, InvalidUtf8);
    }
    let (out, summary) = norm(
        "m,t=caf\u{e9} s=\"\u{1f600} ok\",\u{b5}=1 1\n".as_bytes(),
        Precision::Nanoseconds,
    );
    assert_eq!(summary.error_count, 0);
    assert_eq!(out, "m,t=caf\u{e9} s=\"\u{1f600} ok\",\u{b5}=1 1\n");
}

#[test]
fn unsigned_fields_are_refused_only_when_asked() {
    let body = b"a,u=1u v=1u,w=2i 1\nb s=\"9u\",x=3i 2\nc v=1i,n=18446744073709551615u 3\n";
    let mut out = Vec::new();
    let s = normalize_with(body, Precision::Nanoseconds, NOW, false, &mut out);
    assert_eq!((s.lines, s.error_count), (3, 0));
    let mut out = Vec::new();
    let s = normalize_with(body, Precision::Nanoseconds, NOW, true, &mut out);
    // A `u` in a tag or inside a string is not an unsigned field.
    assert_eq!(out, b"b s=\"9u\",x=3i 2\n");
    assert_eq!((s.lines, s.error_count), (1, 2));
    let at: Vec<(usize, ParseErrorKind, usize)> = s
        .errors
        .iter()
        .map(|e| (e.line, e.error.kind, e.error.column))
        .collect();
    assert_eq!(at, vec![(1, UnsignedForV1, 10), (3, UnsignedForV1, 10)]);
}

#[test]
fn invalid_lines_are_rejected_and_neighbours_kept() {
    for (line, kind, column) in INVALID {
        let body = format!("good,n=1 v=1 1\n{line}\r\n\n good v=2i 2");
        let (out, summary) = norm(body.as_bytes(), Precision::Nanoseconds);
        if *kind == UnterminatedString {
            // An open string takes in the rest of the body, newlines included.
            assert_eq!(out, "good,n=1 v=1 1\n", "{line:?}");
            assert_eq!(summary.lines, 1, "{line:?}");
        } else {
            assert_eq!(out, "good,n=1 v=1 1\ngood v=2i 2\n", "{line:?}");
            assert_eq!(summary.lines, 2, "{line:?}");
        }
        assert_eq!(summary.error_count, 1, "{line:?}");
        let err = &summary.errors[0];
        assert_eq!(err.line, 2, "{line:?}");
        assert_eq!(
            err.error,
            ParseError {
                kind: *kind,
                column: *column
            },
            "{line:?}"
        );
        // parse_line reports the timestamp as written; only i64 overflow is its business.
        if *kind != TimestampOutOfRange {
            assert_eq!(
                parse_line(line.as_bytes()).unwrap_err().kind,
                *kind,
                "{line:?}"
            );
        }
    }
    assert_eq!(
        parse_line(b"m v=1 9223372036854775808").unwrap_err(),
        ParseError {
            kind: TimestampOutOfRange,
            column: 7
        }
    );
    assert_eq!(
        parse_line(b"m v=1 -9223372036854775808").unwrap().timestamp,
        Some(i64::MIN)
    );
}

#[test]
fn timestamp_range_depends_on_precision() {
    for (line, precision) in [
        ("m v=1 9223372037", Precision::Seconds),
        ("m v=1 -9223372037", Precision::Seconds),
        ("m v=1 153722867281", Precision::Minutes),
        ("m v=1 9223372036854776", Precision::Milliseconds),
    ] {
        let (out, summary) = norm(line.as_bytes(), precision);
        assert_eq!(out, "", "{line}");
        assert_eq!(summary.errors[0].error.kind, TimestampOutOfRange, "{line}");
        assert_eq!(summary.errors[0].error.column, 7, "{line}");
        // The line itself is well formed; only the conversion fails.
        assert!(parse_line(line.as_bytes()).is_ok());
    }
}

#[test]
fn blank_and_comment_lines_through_parse_line() {
    assert_eq!(parse_line(b"").unwrap_err().kind, MissingMeasurement);
    assert_eq!(parse_line(b" \t\r\n").unwrap_err().kind, MissingMeasurement);
    assert_eq!(
        parse_line(b"  # cpu v=1").unwrap_err(),
        ParseError {
            kind: Comment,
            column: 3
        }
    );
}

#[test]
fn parse_line_exposes_sections() {
    let l = parse_line(b" cpu\\ 1,b=2,a=x\\ y  v=1,s=\"a b\" \t42 \r\n").unwrap();
    assert_eq!(l.measurement, b"cpu\\ 1");
    assert_eq!(l.tags, b"b=2,a=x\\ y");
    assert_eq!(l.fields, b"v=1,s=\"a b\"");
    assert_eq!(l.timestamp, Some(42));
    assert_eq!(l.key_and_fields, b"cpu\\ 1,b=2,a=x\\ y  v=1,s=\"a b\"");
    let tags: Vec<_> = l.tags().collect();
    assert_eq!(tags, [(&b"b"[..], &b"2"[..]), (b"a", b"x\\ y")]);

    let l = parse_line(b"m v=1").unwrap();
    assert_eq!(l.tags, b"");
    assert_eq!(l.tags().count(), 0);
    assert_eq!(l.timestamp, None);
    assert_eq!(l.key_and_fields, b"m v=1");
}

fn field_values(line: &str) -> Vec<(String, FieldValue<'_>)> {
    parse_line(line.as_bytes())
        .unwrap_or_else(|e| panic!("{line}: {e}"))
        .fields()
        .map(|(k, v)| (String::from_utf8(k.to_vec()).unwrap(), v))
        .collect()
}

#[test]
fn field_values_are_typed() {
    use FieldValue::*;
    let v = field_values(
        "m a=1,b=-1.5,c=1.,d=.5,e=1e10,f=-2.5E-3,g=-12i,h=12u,i=t,j=FALSE,k=\"x\",l=007,m=1e-400",
    );
    let expected = [
        ("a", Float(1.0)),
        ("b", Float(-1.5)),
        ("c", Float(1.0)),
        ("d", Float(0.5)),
        ("e", Float(1e10)),
        ("f", Float(-2.5e-3)),
        ("g", Int(-12)),
        ("h", UInt(12)),
        ("i", Bool(true)),
        ("j", Bool(false)),
        ("k", Str(b"x")),
        ("l", Float(7.0)),
        ("m", Float(0.0)),
    ];
    assert_eq!(v.len(), expected.len());
    for ((k, v), (ek, ev)) in v.iter().zip(expected) {
        assert_eq!((k.as_str(), *v), (ek, ev));
    }

    let v = field_values(
        "m a=-9223372036854775808i,b=9223372036854775807i,c=18446744073709551615u,d=0u,e=1.7976931348623157e308",
    );
    assert_eq!(v[0].1, Int(i64::MIN));
    assert_eq!(v[1].1, Int(i64::MAX));
    assert_eq!(v[2].1, UInt(u64::MAX));
    assert_eq!(v[3].1, UInt(0));
    assert_eq!(v[4].1, Float(f64::MAX));

    for t in ["t", "T", "true", "True", "TRUE"] {
        assert_eq!(field_values(&format!("m b={t}"))[0].1, Bool(true), "{t}");
    }
    for f in ["f", "F", "false", "False", "FALSE"] {
        assert_eq!(field_values(&format!("m b={f}"))[0].1, Bool(false), "{f}");
    }

    let v = field_values(r#"m s="say \"hi\", a=b c\\",k\ e\,y\=s=1 9"#);
    assert_eq!(v[0].0, "s");
    assert_eq!(v[0].1, Str(br#"say \"hi\", a=b c\\"#));
    let Str(raw) = v[0].1 else { unreachable!() };
    assert_eq!(&*string_unescaped(raw), br#"say "hi", a=b c\"#);
    assert_eq!(v[1].0, r"k\ e\,y\=s");
    assert_eq!(&*tag_unescaped(v[1].0.as_bytes()), b"k e,y=s");
}

#[test]
fn field_iter_stops_on_hand_made_garbage() {
    let line = Line {
        measurement: b"m",
        tags: b"a,=\\",
        fields: b"a=1,b=zz,c=2",
        timestamp: None,
        key_and_fields: b"",
    };
    assert_eq!(line.fields().count(), 1);
    assert!(line.tags().count() <= 2);
}

#[test]
fn unescaping_follows_influxdb() {
    assert!(matches!(measurement_unescaped(b"cpu"), Cow::Borrowed(_)));
    assert_eq!(&*measurement_unescaped(br"c\,p\ u"), b"c,p u");
    // `\=` is not a measurement escape and `\\` is no escape at all in InfluxDB's key.
    assert_eq!(&*measurement_unescaped(br"a\=b\\c\x"), br"a\=b\\c\x");
    assert_eq!(&*measurement_unescaped(br"a\\,b"), br"a\,b");
    assert_eq!(&*measurement_unescaped(b"a\\"), b"a\\");
    assert_eq!(&*tag_unescaped(br"k\=\,\ \x"), br"k=, \x");
    assert_eq!(&*string_unescaped(br#"\"\\\n"#), br#""\\n"#);
}

#[test]
fn duplicate_tags_found_among_many() {
    let mut line = String::from("m");
    for n in (0..100).rev() {
        line.push_str(&format!(",k{n}=v"));
    }
    let ok = format!("{line} v=1");
    assert!(parse_line(ok.as_bytes()).is_ok());
    let dup = format!("{line},k42=w,k7=x v=1");
    let err = parse_line(dup.as_bytes()).unwrap_err();
    assert_eq!(err.kind, DuplicateTagKey);
    assert_eq!(&dup[err.column - 1..err.column + 3], "k42=");
    // Small unsorted set: the later of the two is reported.
    let err = parse_line(b"m,z=1,b=2,a=3,b=4 v=1").unwrap_err();
    assert_eq!(
        err,
        ParseError {
            kind: DuplicateTagKey,
            column: 15
        }
    );
}

#[test]
fn errors_are_capped_counted_and_described() {
    let mut body = String::new();
    for n in 0..25 {
        body.push_str(if n % 2 == 0 { "cpu\n" } else { "cpu v=1 1\n" });
    }
    let (out, summary) = norm(body.as_bytes(), Precision::Nanoseconds);
    assert_eq!(summary.lines, 12);
    assert_eq!(out.lines().count(), 12);
    assert_eq!(summary.error_count, 13);
    assert_eq!(summary.errors.len(), MAX_REPORTED_ERRORS);
    assert_eq!(summary.errors[1].line, 3);
    let msg = describe_errors(&summary, 25);
    assert!(
        msg.starts_with(
            "13 of 25 lines invalid: line 1: missing fields (column 4): \"cpu\"; line 3: "
        ),
        "{msg}"
    );
    assert!(
        msg.ends_with("; line 19: missing fields (column 4): \"cpu\"; and 3 more"),
        "{msg}"
    );

    let (_, summary) = norm(b"cpu,host=a", Precision::Nanoseconds);
    assert_eq!(
        describe_errors(&summary, 1),
        "1 of 1 line invalid: line 1: missing fields (column 11): \"cpu,host=a\""
    );
    assert_eq!(
        summary.errors[0].to_string(),
        "line 1: missing fields (column 11): \"cpu,host=a\""
    );
}

#[test]
fn excerpts_are_short_and_printable() {
    let long = format!("{}é{} v=", "a".repeat(63), "b".repeat(100));
    let (_, summary) = norm(long.as_bytes(), Precision::Nanoseconds);
    assert_eq!(summary.errors[0].excerpt, format!("{}...", "a".repeat(63)));
    let (_, summary) = norm(b"c\tp\x01u\xff\r\n", Precision::Nanoseconds);
    assert_eq!(summary.errors[0].excerpt, "c p\u{FFFD}u\u{FFFD}");
}

/// The body from the report of a point injected through a string value.
const INJECTION: &str = "applog,app=web msg=\"request failed:\n\
                         injected,host=x value=42 1764000000000000000\n\
                         end\" 1764000000000000000\n";

#[test]
fn a_newline_inside_a_string_is_part_of_the_value() {
    let (out, summary) = norm(INJECTION.as_bytes(), Precision::Nanoseconds);
    assert_eq!(summary.error_count, 0, "{:?}", summary.errors);
    assert_eq!(summary.lines, 1);
    assert_eq!(out, INJECTION);
    let line = parse_line(out.trim_end().as_bytes()).unwrap();
    assert_eq!(line.measurement, b"applog");
    let fields = field_values(out.trim_end());
    assert_eq!(
        fields,
        [(
            "msg".to_string(),
            FieldValue::Str(b"request failed:\ninjected,host=x value=42 1764000000000000000\nend")
        )]
    );
    // Not canonical (seconds): rewritten, newlines kept.
    let (out, summary) = norm(b"m s=\"a\nb\",x=1i 17\n", Precision::Seconds);
    assert_eq!(summary.lines, 1);
    assert_eq!(out, "m s=\"a\nb\",x=1i 17000000000\n");
}

#[test]
fn point_ends_honour_quoted_field_strings_only() {
    for (text, end) in [
        ("m f=1\nn f=2\n", Some(5)),
        ("m f=1", None),
        ("\nm f=1\n", Some(0)),
        ("m f=\"a\nb\" 1\nn f=1\n", Some(11)),
        ("m f=\"a\nb\"\n", Some(9)),
        ("m f=1,g=\"a\nb\",h=2i\n", Some(18)),
        // Escaped quotes and backslashes inside the string.
        ("m f=\"a\\\"\nb\"\n", Some(11)),
        ("m f=\"a\\\\\"\nb\"\n", Some(9)),
        ("m f=\"a\\\n\"\n", Some(9)),
        // Not closed yet: the point goes on past the end of the buffer.
        ("m f=\"a\nb", None),
        ("m f=\"a\\\"\n", None),
        ("m f=\"a\\", None),
        // Quotes in the measurement, tags, field keys, other values and the timestamp
        // are literal bytes.
        ("m\"a f=1\nn f=\"x\"\n", Some(7)),
        ("m,t=\"a f=1\n\"\n", Some(10)),
        ("m,t=a\\ \"b f=1\n", Some(13)),
        ("m f\"=1\nn\"\n", Some(6)),
        ("m f=a\"b\nc\"\n", Some(7)),
        ("m f=1 \"12\n\"\n", Some(9)),
        // A comment ends at its newline whatever it holds.
        ("# m f=\"a\nm f=1\n", Some(8)),
        ("  # f=\"\nm f=1\n", Some(7)),
        // After a closed string, only a comma starts another field.
        ("m f=\"a\"x=\"\nn f=1\n", Some(10)),
        ("m f=\"a\" x=\"\nn f=1\n", Some(11)),
        // Outside strings, a newline ends the point even after a backslash.
        ("m\\\nn f=\"\n\"\n", Some(2)),
        ("m f\\\n=\"\n\"\n", Some(4)),
        ("m,t=\\\\\n f=\"\n\"\n", Some(6)),
    ] {
        assert_eq!(point_end(text.as_bytes()), end, "{text:?}");
    }
}

#[test]
fn points_counts_and_cuts_agree() {
    let body = b"a f=\"x\ny\" 1\nb f=1 2\n\nc f=\"\n\n\" 3\nd f=\"open\n";
    let got: Vec<&[u8]> = points(body).collect();
    assert_eq!(
        got,
        [
            &b"a f=\"x\ny\" 1\n"[..],
            b"b f=1 2\n",
            b"\n",
            b"c f=\"\n\n\" 3\n",
            b"d f=\"open\n",
        ]
    );
    assert_eq!(count_points(body), 4);
    assert_eq!(count_points(b"a f=1\nb f=2\n"), 2);
    assert_eq!(last_point_end(body), Some(body.len() - 10));
    assert_eq!(last_point_end(&body[..8]), None);
    assert_eq!(last_point_end(&body[..12]), Some(12));
    assert_eq!(last_point_end(&body[..19]), Some(12));
    assert_eq!(last_point_end(b"a f=1\nb f=2\nc"), Some(12));
    assert_eq!(last_point_end(b""), None);
}

#[test]
fn errors_name_the_physical_line_a_point_starts_on() {
    let body =
        b"a s=\"1\n2\n3\" 1\nbad\nb s=\"x\ny\",bad 2\nc f=1 3\nd s=\"never\nclosed 4\ne f=1 5\n";
    let (out, summary) = norm(body, Precision::Nanoseconds);
    assert_eq!(out, "a s=\"1\n2\n3\" 1\nc f=1 3\n");
    let lines: Vec<(usize, ParseErrorKind)> = summary
        .errors
        .iter()
        .map(|e| (e.line, e.error.kind))
        .collect();
    // The unterminated string takes in the rest of the body: one invalid point.
    assert_eq!(
        lines,
        [
            (4, MissingFields),
            (5, InvalidFieldFormat),
            (8, UnterminatedString)
        ]
    );
    assert_eq!(
        describe_errors(&summary, summary.lines + summary.error_count),
        "3 of 5 lines invalid: line 4: missing fields (column 4): \"bad\"; \
         line 5: invalid field format (column 14): \"b s=\"x\u{FFFD}y\",bad 2\"; \
         line 8: unterminated string (column 5): \"d s=\"never\u{FFFD}closed 4\u{FFFD}e f=1 5\u{FFFD}\""
    );
}

// ---- property tests ----

/// Bytes biased toward line-protocol syntax so that random input reaches deep states.
fn lp_bytes() -> impl Strategy<Value = Vec<u8>> {
    let byte = prop_oneof![
        3 => prop::sample::select(
            b" ,=\\\"\n\r\t#-.+0123456789eEiutfTFabc".to_vec()
        ),
        1 => any::<u8>(),
    ];
    prop::collection::vec(byte, 0..300)
}

/// Well-formed lines with bits mangled, to exercise error paths near valid input.
fn mangled_lines() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::collection::vec(valid_line(), 1..6),
        prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
    )
        .prop_map(|(lines, edits)| {
            let mut body: Vec<u8> = lines
                .iter()
                .flat_map(|l| l.text.bytes().chain([b'\n']))
                .collect();
            for (at, byte) in edits {
                let at = at.index(body.len());
                body[at] = byte;
            }
            body
        })
}

fn any_body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![lp_bytes(), mangled_lines()]
}

/// The points of `body` that are neither blank nor comments, as `point_end` cuts them.
fn counted_points(body: &[u8]) -> u64 {
    points(body)
        .filter(|l| {
            let l = l.strip_suffix(b"\n").unwrap_or(l);
            // Trailing blanks and '\r' are trimmed; a leading '\r' is not blank.
            let end = l.len() - l.iter().rev().take_while(|b| b" \t\r".contains(b)).count();
            let first = l[..end].iter().find(|b| !b" \t".contains(b));
            first.is_some_and(|&b| b != b'#')
        })
        .count() as u64
}

fn check_output(out: &[u8], summary: &Summary) {
    assert!(out.is_empty() || out.ends_with(b"\n"));
    let mut count = 0;
    for line in points(out) {
        let line = line
            .strip_suffix(b"\n")
            .expect("output points end in a newline");
        assert!(!line.is_empty());
        count += 1;
        let parsed = parse_line(line).unwrap_or_else(|e| {
            panic!(
                "output line {:?} does not parse: {e}",
                String::from_utf8_lossy(line)
            )
        });
        let ts = parsed.timestamp.expect("output lines carry a timestamp");
        let mut rebuilt = parsed.key_and_fields.to_vec();
        rebuilt.extend_from_slice(format!(" {ts}").as_bytes());
        assert_eq!(line, &rebuilt[..]);
    }
    assert_eq!(count, summary.lines);
    assert_eq!(
        summary.errors.len() as u64,
        summary.error_count.min(MAX_REPORTED_ERRORS as u64)
    );
}

#[derive(Debug, Clone)]
enum Value {
    Float(f64, String),
    Int(i64),
    UInt(u64),
    Str(String),
    Bool(bool, &'static str),
}

#[derive(Debug, Clone)]
struct Generated {
    text: String,
    measurement: String,
    tags: Vec<(String, String)>,
    fields: Vec<(String, Value)>,
    timestamp: Option<i64>,
}

fn name_char() -> impl Strategy<Value = char> {
    prop_oneof![
        6 => prop::char::range('a', 'z'),
        2 => prop::sample::select(vec![',', ' ', '=', '\\', '"', '#', '\t', '-', '.', '0', '\r']),
        1 => prop::sample::select(vec!['é', '東', '\u{1F600}']),
    ]
}

fn raw_name() -> impl Strategy<Value = String> {
    prop::collection::vec(name_char(), 1..8).prop_map(|v| v.into_iter().collect())
}

/// Escapes for the key section (measurement, tags). Backslashes stay literal, as in
/// InfluxDB, so a name must not end with one: it would escape the separator after it.
fn key_safe(raw: String) -> String {
    match raw.strip_suffix('\\') {
        Some(rest) => format!("{rest}/"),
        None => raw,
    }
}

fn escape(raw: &str, specials: &[char]) -> String {
    let mut s = String::new();
    for c in raw.chars() {
        if specials.contains(&c) {
            s.push('\\');
        }
        s.push(c);
    }
    s
}

/// Field keys are scanned pairwise, so a literal backslash must not precede a special
/// byte or end the key.
fn field_key_safe(raw: String) -> String {
    let chars: Vec<char> = raw.chars().collect();
    chars
        .iter()
        .enumerate()
        .map(|(i, &c)| match (c, chars.get(i + 1)) {
            ('\\', None | Some(',' | '=' | ' ' | '\\')) => '/',
            _ => c,
        })
        .collect()
}

fn value() -> impl Strategy<Value = Value> {
    prop_oneof![
        (any::<f64>().prop_filter("finite", |f| f.is_finite()), 0..3u8).prop_map(|(f, style)| {
            let text = match style {
                0 => format!("{f}"),
                1 => format!("{f:e}"),
                _ => format!("{f:?}"),
            };
            Value::Float(f, text)
        }),
        any::<i64>().prop_map(Value::Int),
        any::<u64>().prop_map(Value::UInt),
        prop::collection::vec(
            prop_oneof![
                4 => prop::char::range(' ', '~'),
                1 => prop::sample::select(vec!['\\', '"', '\t', '\r', '\n', 'é', '東', '\u{1F600}']),
            ],
            0..12
        )
        .prop_map(|v| Value::Str(v.into_iter().collect())),
        prop::sample::select(vec![
            (true, "t"), (true, "T"), (true, "true"), (true, "True"), (true, "TRUE"),
            (false, "f"), (false, "F"), (false, "false"), (false, "False"), (false, "FALSE"),
        ])
        .prop_map(|(b, s)| Value::Bool(b, s)),
    ]
}

fn valid_line() -> impl Strategy<Value = Generated> {
    let measurement = raw_name()
        .prop_map(key_safe)
        .prop_filter("not a comment or blank-led", |m| {
            !m.starts_with(['#', '\t'])
        });
    let tags = prop::collection::btree_map(
        raw_name().prop_map(key_safe),
        raw_name().prop_map(key_safe),
        0..5,
    )
    .prop_map(|m| m.into_iter().collect::<Vec<_>>())
    .prop_shuffle();
    let field_key = raw_name()
        .prop_map(field_key_safe)
        .prop_filter("blanks before fields are skipped", |k| !k.starts_with('\t'));
    let fields = prop::collection::vec((field_key, value()), 1..5);
    let timestamp = prop::option::of(MIN_TIMESTAMP_NS..=MAX_TIMESTAMP_NS);
    (measurement, tags, fields, timestamp).prop_map(|(measurement, tags, fields, timestamp)| {
        let mut text = escape(&measurement, &[',', ' ']);
        for (k, v) in &tags {
            text.push(',');
            text.push_str(&escape(k, &[',', '=', ' ']));
            text.push('=');
            text.push_str(&escape(v, &[',', '=', ' ']));
        }
        for (n, (k, v)) in fields.iter().enumerate() {
            text.push(if n == 0 { ' ' } else { ',' });
            text.push_str(&escape(k, &[',', '=', ' ']));
            text.push('=');
            match v {
                Value::Float(_, s) => text.push_str(s),
                Value::Int(i) => text.push_str(&format!("{i}i")),
                Value::UInt(u) => text.push_str(&format!("{u}u")),
                Value::Str(s) => text.push_str(&format!("\"{}\"", escape(s, &['"', '\\']))),
                Value::Bool(_, s) => text.push_str(s),
            }
        }
        if let Some(ts) = timestamp {
            text.push_str(&format!(" {ts}"));
        }
        Generated {
            text,
            measurement,
            tags,
            fields,
            timestamp,
        }
    })
}

proptest! {
    #[test]
    fn normalize_never_panics_and_emits_whole_valid_lines(
        body in any_body(),
        precision in prop::sample::select(vec![
            Precision::Nanoseconds, Precision::Microseconds, Precision::Seconds, Precision::Hours,
        ]),
    ) {
        let mut out = Vec::new();
        let summary = normalize(&body, precision, NOW, &mut out);
        check_output(&out, &summary);
        // normalize cuts where point_end does.
        prop_assert_eq!(summary.lines + summary.error_count, counted_points(&body));
        for e in &summary.errors {
            prop_assert!(e.excerpt.chars().count() <= EXCERPT_BYTES + 3);
            prop_assert!(e.line >= 1);
            let _ = describe_errors(&summary, summary.lines + summary.error_count);
        }
    }

    /// Arbitrary bytes, not biased toward line protocol: whatever comes in,
    /// only whole, valid UTF-8 lines go out, and every other line is counted.
    #[test]
    fn arbitrary_bytes_give_only_valid_utf8_lines(body in prop::collection::vec(any::<u8>(), 0..2000)) {
        let mut out = Vec::new();
        let summary = normalize(&body, Precision::Milliseconds, NOW, &mut out);
        check_output(&out, &summary);
        prop_assert!(std::str::from_utf8(&out).is_ok());
        prop_assert_eq!(summary.lines + summary.error_count, counted_points(&body));
    }

    #[test]
    fn iterators_terminate_on_any_sections(tags in lp_bytes(), fields in lp_bytes()) {
        let line = Line {
            measurement: b"m",
            tags: &tags,
            fields: &fields,
            timestamp: None,
            key_and_fields: b"",
        };
        prop_assert!(line.tags().count() <= tags.len());
        prop_assert!(line.fields().count() <= fields.len());
    }

    #[test]
    fn normalize_is_idempotent(body in any_body()) {
        let mut once = Vec::new();
        let first = normalize(&body, Precision::Microseconds, NOW, &mut once);
        let mut twice = Vec::new();
        let second = normalize(&once, Precision::Nanoseconds, 42, &mut twice);
        prop_assert_eq!(second.error_count, 0);
        prop_assert_eq!(second.lines, first.lines);
        prop_assert_eq!(twice, once);
    }

    /// Random points (strings with quotes, backslashes, newlines, multi-byte UTF-8),
    /// serialised and cut at random places into the pieces a writer, a chunked or
    /// gzip-member body, or a growing file delivers: the same points come out whole,
    /// and every cut the queue and the shipper make falls between them.
    #[test]
    fn points_survive_any_cutting(
        gs in prop::collection::vec(valid_line(), 1..8),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
        crlf in any::<bool>(),
    ) {
        let eol = if crlf { "\r\n" } else { "\n" };
        let body: String = gs.iter().map(|g| format!("{}{eol}", g.text)).collect();
        let body = body.as_bytes();
        let mut at: Vec<usize> = cuts.iter().map(|c| c.index(body.len() + 1)).collect();
        at.sort_unstable();
        at.dedup();
        let mut pieces = Vec::new();
        let mut from = 0;
        for &k in at.iter().chain([&body.len()]) {
            pieces.push(&body[from..k]);
            from = k;
        }

        // The whole body, as the HTTP path sees it once collected (and inflated: gzip
        // members made of the pieces inflate to the same bytes).
        let mut whole = Vec::new();
        let summary = normalize(body, Precision::Nanoseconds, NOW, &mut whole);
        prop_assert_eq!(summary.error_count, 0, "{:?}", summary.errors);
        prop_assert_eq!(summary.lines as usize, gs.len());
        let mut members = Vec::new();
        for p in &pieces {
            members.extend(crate::ship::gzip(p, 1));
        }
        let inflated = crate::ingest::body::decompress(&members, 1 << 20).unwrap();
        prop_assert_eq!(&inflated[..], body);

        // Each output point holds exactly the generated strings.
        let got: Vec<&[u8]> = points(&whole).collect();
        prop_assert_eq!(got.len(), gs.len());
        for (point, g) in got.iter().zip(&gs) {
            let line = parse_line(point).unwrap();
            let strings: Vec<Vec<u8>> = line.fields().filter_map(|(_, v)| match v {
                FieldValue::Str(s) => Some(string_unescaped(s).into_owned()),
                _ => None,
            }).collect();
            let want: Vec<Vec<u8>> = g.fields.iter().filter_map(|(_, v)| match v {
                Value::Str(s) => Some(s.as_bytes().to_vec()),
                _ => None,
            }).collect();
            prop_assert_eq!(strings, want);
        }

        // As the tail source reads a file growing by the pieces: whole points only,
        // the rest waits for more bytes.
        let mut pending = Vec::new();
        let mut followed = Vec::new();
        for p in &pieces {
            pending.extend_from_slice(p);
            if let Some(k) = last_point_end(&pending) {
                let s = normalize(&pending[..k], Precision::Nanoseconds, NOW, &mut followed);
                prop_assert_eq!(s.error_count, 0);
                pending.drain(..k);
            }
        }
        prop_assert!(pending.is_empty(), "left over: {:?}", String::from_utf8_lossy(&pending));
        prop_assert_eq!(&followed, &whole);

        // Cuts of the queued form: any prefix is cut at a point boundary, and the
        // counts agree with the points.
        prop_assert_eq!(count_points(&whole), gs.len());
        let ends: Vec<usize> = got.iter().scan(0, |n, p| { *n += p.len(); Some(*n) }).collect();
        for &k in &at {
            let k = k.min(whole.len());
            let cut = last_point_end(&whole[..k]);
            let want = ends.iter().copied().rfind(|&e| e <= k);
            prop_assert_eq!(cut, want);
        }
    }

    #[test]
    fn generated_lines_validate_and_round_trip(g in valid_line()) {
        let line = parse_line(g.text.as_bytes())
            .unwrap_or_else(|e| panic!("{:?} rejected: {e}", g.text));
        prop_assert_eq!(line.timestamp, g.timestamp);
        prop_assert_eq!(&*measurement_unescaped(line.measurement), g.measurement.as_bytes());
        let tags: Vec<_> = line.tags().collect();
        prop_assert_eq!(tags.len(), g.tags.len());
        for ((k, v), (rk, rv)) in tags.iter().zip(&g.tags) {
            prop_assert_eq!(&*tag_unescaped(k), rk.as_bytes());
            prop_assert_eq!(&*tag_unescaped(v), rv.as_bytes());
        }
        let fields: Vec<_> = line.fields().collect();
        prop_assert_eq!(fields.len(), g.fields.len());
        for ((k, v), (rk, rv)) in fields.iter().zip(&g.fields) {
            prop_assert_eq!(&*tag_unescaped(k), rk.as_bytes());
            match (v, rv) {
                (FieldValue::Float(a), Value::Float(b, _)) => prop_assert_eq!(a, b),
                (FieldValue::Int(a), Value::Int(b)) => prop_assert_eq!(a, b),
                (FieldValue::UInt(a), Value::UInt(b)) => prop_assert_eq!(a, b),
                (FieldValue::Str(a), Value::Str(b)) => {
                    prop_assert_eq!(&*string_unescaped(a), b.as_bytes())
                }
                (FieldValue::Bool(a), Value::Bool(b, _)) => prop_assert_eq!(a, b),
                (a, b) => prop_assert!(false, "{:?} decoded as {:?}", b, a),
            }
        }

        let mut out = Vec::new();
        let summary = normalize(g.text.as_bytes(), Precision::Nanoseconds, NOW, &mut out);
        prop_assert_eq!(summary.error_count, 0);
        prop_assert_eq!(summary.lines, 1);
        let expected = format!("{} {}\n", g.text.split_at(line.key_and_fields.len()).0, g.timestamp.unwrap_or(NOW));
        prop_assert_eq!(String::from_utf8(out).unwrap(), expected);
    }
}

#[test]
fn series_keys_end_at_the_first_unescaped_space() {
    assert_eq!(series_key(b"cpu,host=a v=1 5\n"), b"cpu,host=a");
    assert_eq!(
        series_key(b"c\\ pu,host=a\\ b v=1 5\n"),
        b"c\\ pu,host=a\\ b"
    );
    assert_eq!(series_key(b"cpu v=\"x y\" 5\n"), b"cpu");
}

#[test]
fn ordering_by_series_keeps_every_point_and_the_last_one_wins() {
    let lines =
        b"b,t=1 v=1 20\na v=1 30\nb,t=1 v=2 10\na v=\"two\nlines\" 10\nb,t=1 v=3 20\na v=9 30\n";
    let mut out = Vec::new();
    order_by_series(lines, &mut out);
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "a v=\"two\nlines\" 10\na v=1 30\na v=9 30\nb,t=1 v=2 10\nb,t=1 v=1 20\nb,t=1 v=3 20\n"
    );
    proptest!(|(lines in proptest::collection::vec(
        (0u8..4, 0i64..5, 0u32..100), 0..60))| {
        let body: String = lines
            .iter()
            .map(|(s, t, v)| format!("m,s={s} v={v}i {t}\n"))
            .collect();
        let mut out = Vec::new();
        order_by_series(body.as_bytes(), &mut out);
        let out = String::from_utf8(out).unwrap();
        let mut a: Vec<&str> = body.lines().collect();
        let mut b: Vec<&str> = out.lines().collect();
        // The same points, sorted by series then time...
        let key = |l: &&str| {
            let (series, rest) = l.split_once(' ').unwrap();
            let ts: i64 = rest.rsplit(' ').next().unwrap().parse().unwrap();
            (series.to_string(), ts)
        };
        prop_assert!(b.windows(2).all(|w| key(&w[0]) <= key(&w[1])));
        // ... and for each series and time, the values in their first order.
        for k in a.iter().map(key) {
            let before: Vec<&str> = a.iter().filter(|l| key(l) == k).copied().collect();
            let after: Vec<&str> = b.iter().filter(|l| key(l) == k).copied().collect();
            prop_assert_eq!(before, after);
        }
        a.sort();
        b.sort();
        prop_assert_eq!(a, b);
    });
}

#[test]
fn lines_given_the_agents_time_are_counted() {
    let body = b"a v=1\nb v=2 17\nbad\nc v=3\n# comment\n\nd v=4 18\n";
    let mut out = Vec::new();
    let s = normalize(body, Precision::Nanoseconds, 99, &mut out);
    assert_eq!((s.lines, s.error_count, s.stamped), (4, 1, 2));
    assert_eq!(out, b"a v=1 99\nb v=2 17\nc v=3 99\nd v=4 18\n");
}
