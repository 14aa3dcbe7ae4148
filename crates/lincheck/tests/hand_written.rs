//! Small histories whose verdict is known by hand.

mod common;

use std::time::Duration;

use common::{acked, cas, read, unanswered, write};
use lincheck::{check, Op, Operation, Outcome, Value, Verdict};

const BUDGET: Duration = Duration::from_secs(10);

fn verdict(history: &[Operation], initial: Value) -> Verdict {
    check(history, initial, BUDGET)
}

#[track_caller]
fn assert_ok(history: &[Operation]) {
    let v = verdict(history, None);
    assert_eq!(v, Verdict::Linearizable, "{history:#?}");
}

/// Asserts a violation; returns its explanation.
#[track_caller]
fn assert_violation(history: &[Operation]) -> String {
    match verdict(history, None) {
        Verdict::Violation { explanation } => {
            println!("{explanation}\n");
            explanation
        }
        other => panic!("expected a violation, got {other:?} for {history:#?}"),
    }
}

#[test]
fn empty_history() {
    assert_ok(&[]);
}

#[test]
fn sequential() {
    assert_ok(&[
        read(1, None, 0, 5),
        write(1, 1, 10, 20),
        read(2, Some(1), 30, 40),
        cas(1, Some(1), 2, true, 50, 60),
        read(2, Some(2), 70, 80),
        cas(2, Some(1), 3, false, 90, 100),
        read(1, Some(2), 110, 120),
    ]);
}

#[test]
fn unsorted_input_is_fine() {
    let mut h = vec![
        read(1, None, 0, 5),
        write(1, 1, 10, 20),
        read(2, Some(1), 30, 40),
        cas(1, Some(1), 2, true, 50, 60),
        read(2, Some(2), 70, 80),
    ];
    h.reverse();
    assert_ok(&h);
}

#[test]
fn concurrent_write_and_read_in_either_order() {
    assert_ok(&[write(1, 1, 0, 100), read(2, None, 10, 20)]);
    assert_ok(&[write(1, 1, 0, 100), read(2, Some(1), 10, 20)]);
    // Two reads inside one write: old then new is fine ...
    assert_ok(&[
        write(1, 1, 0, 100),
        read(2, None, 10, 20),
        read(2, Some(1), 30, 40),
    ]);
    // ... new then old is not.
    assert_violation(&[
        write(1, 1, 0, 100),
        read(2, Some(1), 10, 20),
        read(2, None, 30, 40),
    ]);
}

#[test]
fn return_at_the_call_instant_is_concurrent() {
    assert_ok(&[write(1, 1, 0, 10), read(2, None, 10, 20)]);
    assert_violation(&[write(1, 1, 0, 10), read(2, None, 11, 20)]);
}

#[test]
fn stale_read_after_completed_write() {
    let why = assert_violation(&[
        write(1, 1, 0, 10),
        write(2, 2, 20, 30),
        read(3, Some(1), 40, 50),
    ]);
    assert!(
        why.contains("Longest linearizable prefix found: 1 operation "),
        "{why}"
    );
    assert!(why.contains("#1 client 2: Write(2)"), "{why}");
    assert!(why.contains("client 3: Read -> Read(Some(1))"), "{why}");
    assert!(why.contains("called at 40 ns, returned at 50 ns"), "{why}");
}

#[test]
fn read_of_a_value_never_written() {
    let why = assert_violation(&[write(1, 1, 0, 10), read(2, Some(7), 20, 30)]);
    assert!(why.contains("no operation writes"), "{why}");
    // A compare-and-set that did not apply writes nothing either.
    assert_violation(&[cas(1, None, 7, false, 0, 10), read(2, Some(7), 20, 30)]);
    // Absent again, once something was written: nothing deletes.
    assert_violation(&[write(1, 1, 0, 10), read(2, None, 20, 30)]);
    assert!(matches!(
        check(&[read(1, None, 0, 10)], Some(5), BUDGET),
        Verdict::Violation { .. }
    ));
}

#[test]
fn lost_write() {
    // Acknowledged write of 2, then every later read sees only 1.
    assert_violation(&[
        write(1, 1, 0, 10),
        write(2, 2, 20, 30),
        read(3, Some(1), 40, 50),
        read(1, Some(1), 60, 70),
        read(2, Some(1), 80, 90),
    ]);
}

#[test]
fn cas_applied_when_expect_cannot_hold() {
    assert_violation(&[
        write(1, 1, 0, 10),
        write(2, 2, 20, 30),
        cas(3, Some(1), 3, true, 40, 50),
    ]);
    // Concurrent with the second write it could have gone first.
    assert_ok(&[
        write(1, 1, 0, 10),
        write(2, 2, 20, 45),
        cas(3, Some(1), 3, true, 40, 50),
    ]);
}

#[test]
fn cas_refused_when_expect_must_hold() {
    assert_violation(&[write(1, 1, 0, 10), cas(2, Some(1), 3, false, 20, 30)]);
    assert_violation(&[cas(2, None, 3, false, 20, 30)]);
    // With a concurrent write it could have seen 2.
    assert_ok(&[
        write(1, 1, 0, 10),
        write(3, 2, 15, 25),
        cas(2, Some(1), 3, false, 20, 30),
    ]);
}

#[test]
fn write_applied_twice() {
    // 1 and 2 are written once each, concurrently with every read: the
    // reads see 1, then 2, then 1 again.
    assert_violation(&[
        write(1, 1, 0, 100),
        write(2, 2, 0, 100),
        read(3, Some(1), 10, 20),
        read(3, Some(2), 30, 40),
        read(3, Some(1), 50, 60),
    ]);
    // Had 1 been written twice, that would be fine.
    assert_ok(&[
        write(1, 1, 0, 100),
        write(2, 2, 0, 100),
        write(4, 1, 0, 100),
        read(3, Some(1), 10, 20),
        read(3, Some(2), 30, 40),
        read(3, Some(1), 50, 60),
    ]);
}

#[test]
fn unknown_write_seen_later() {
    assert_ok(&[
        unanswered(1, Op::Write(1), 0),
        read(2, None, 10, 20),
        read(2, Some(1), 1_000, 1_010),
        read(3, Some(1), 2_000, 2_010),
    ]);
    // ... but not before it was called.
    assert_violation(&[read(2, Some(1), 10, 20), unanswered(1, Op::Write(1), 30)]);
    // ... and not seen, lost, then seen again.
    assert_violation(&[
        unanswered(1, Op::Write(1), 0),
        read(2, Some(1), 10, 20),
        write(3, 2, 30, 40),
        read(2, Some(1), 50, 60),
    ]);
}

#[test]
fn unknown_write_never_seen() {
    assert_ok(&[
        write(1, 1, 0, 10),
        unanswered(1, Op::Write(2), 20),
        read(2, Some(1), 30, 40),
        read(2, Some(1), 5_000, 5_010),
    ]);
}

#[test]
fn unknown_write_explains_a_refused_cas() {
    // Only the unknown write of 9 can make the compare-and-set fail.
    assert_ok(&[
        write(1, 1, 0, 10),
        unanswered(2, Op::Write(9), 15),
        cas(3, Some(1), 3, false, 20, 30),
    ]);
    assert_violation(&[write(1, 1, 0, 10), cas(3, Some(1), 3, false, 20, 30)]);
}

#[test]
fn unknown_cas_either_way() {
    let base = || {
        vec![
            write(1, 1, 0, 10),
            unanswered(
                2,
                Op::Cas {
                    expect: Some(1),
                    new: 2,
                },
                20,
            ),
        ]
    };
    let mut applied = base();
    applied.push(read(3, Some(2), 100, 110));
    assert_ok(&applied);
    let mut not_applied = base();
    not_applied.push(read(3, Some(1), 100, 110));
    assert_ok(&not_applied);
    // Late: first not applied, then applied.
    let mut late = base();
    late.push(read(3, Some(1), 100, 110));
    late.push(read(3, Some(2), 200, 210));
    assert_ok(&late);
    // It cannot apply once 1 is gone.
    let mut gone = base();
    gone.push(write(3, 3, 100, 110));
    gone.push(read(3, Some(2), 200, 210));
    assert_violation(&gone);
}

#[test]
fn unknown_read_is_ignored() {
    assert_ok(&[
        write(1, 1, 0, 10),
        acked(2, Op::Read, 20, 30, Outcome::Unknown),
        unanswered(2, Op::Read, 40),
    ]);
}

#[test]
fn initial_value() {
    let h = [
        read(1, Some(5), 0, 10),
        cas(1, Some(5), 6, true, 20, 30),
        cas(2, Some(5), 7, false, 40, 50),
    ];
    assert_eq!(check(&h, Some(5), BUDGET), Verdict::Linearizable);
    assert!(matches!(check(&h, None, BUDGET), Verdict::Violation { .. }));
}

#[test]
fn acknowledged_without_return_time_is_open_ended() {
    let open = Operation {
        client: 1,
        op: Op::Write(1),
        call_ns: 0,
        return_ns: None,
        outcome: Outcome::Written,
    };
    assert_ok(&[open.clone(), read(2, None, 100, 110)]);
    assert_ok(&[open.clone(), read(2, Some(1), 100, 110)]);
}

#[test]
fn malformed_operations() {
    let why = assert_violation(&[acked(1, Op::Write(1), 0, 10, Outcome::Read(None))]);
    assert!(why.contains("malformed"), "{why}");
    let why = assert_violation(&[write(1, 1, 10, 5)]);
    assert!(why.contains("returned before it was called"), "{why}");
}

#[test]
fn many_unobserved_unknown_writes_do_not_blow_up() {
    // 60 unanswered writes of values nobody reads, then a stale read: the
    // search must not try all 2^60 subsets of them.
    let mut h = vec![write(1, 1, 0, 10)];
    for i in 0..60 {
        h.push(unanswered(2 + i, Op::Write(100 + i), 20 + i));
    }
    h.push(write(1, 2, 100, 110));
    h.push(read(1, Some(2), 120, 130));
    h.push(cas(1, Some(2), 3, false, 140, 150)); // needs an unknown write
    h.push(read(1, Some(1), 160, 170));
    let why = assert_violation(&h);
    assert!(why.contains("more operations without an answer"), "{why}");
}

#[test]
fn zero_budget_gives_up() {
    let h = common::simulate(common::Sim {
        clients: 4,
        ops: 3_000,
        unknowns: 0,
        bursts: false,
        seed: 1,
    });
    match check(&h, None, Duration::ZERO) {
        Verdict::Unknown { explored } => assert!(explored > 0),
        other => panic!("{other:?}"),
    }
}
