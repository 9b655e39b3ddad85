"""benchmarks.stalls: the longest stretches in which the event loop did not turn, and what ran."""

from __future__ import annotations

from benchmarks.stalls import find_stalls


def _document(main: list[list[int]], other: list[list[int]]) -> dict:
    frames = [{"name": "Runner.run", "line": 118}, {"name": "_handle", "line": 10}, {"name": "Path.unlink", "line": 1147},
              {"name": "_worker", "line": 81}, {"name": "write_table", "line": 5}]
    return {"shared": {"frames": frames},
            "profiles": [{"name": 'Thread 1 "MainThread"', "samples": main}, {"name": 'Thread 2 "landing"', "samples": other}]}


def test_the_longest_busy_stretch_comes_first_with_what_ran_and_what_else_did() -> None:
    idle, handler, unlink = [0], [0, 1], [0, 2]
    main = [idle, handler, idle, unlink, unlink, unlink, idle, handler, handler, idle]
    other = [[3]] * 3 + [[4]] * 3 + [[3]] * 4  # the landing thread wrote Parquet during the long one
    stalls = find_stalls(_document(main, other))
    assert [(s.first_tick, s.ticks) for s in stalls] == [(3, 3), (7, 2), (1, 1)]
    longest = stalls[0]
    assert longest.millis(250) == 12.0
    assert list(longest.main) == ["Path.unlink:1147 <- Runner.run:118"]
    assert list(longest.others) == ['Thread 2 "landing"'] and "write_table:5" in next(iter(longest.others['Thread 2 "landing"']))
    assert stalls[1].others == {}  # the other thread only waited then


def test_an_idle_recording_has_no_stalls() -> None:
    assert find_stalls(_document([[0]] * 5, [[3]] * 5)) == []


def test_a_working_frame_whose_name_contains_a_waiting_word_counts_as_work() -> None:
    doc = _document([[0, 1]] * 2, [[5]] * 2)
    doc["shared"]["frames"].append({"name": "Transport.get_extra_info", "line": 3})  # not Queue.get
    (stall,) = find_stalls(doc)
    assert list(stall.others['Thread 2 "landing"']) == ["Transport.get_extra_info:3"]
