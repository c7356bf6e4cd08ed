"""The mutation check's verdicts, read from real pytest reports of small generated test files."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("mutation_check", ROOT / "scripts" / "mutation_check.py")
mutation_check = importlib.util.module_from_spec(spec)
sys.modules["mutation_check"] = mutation_check  # dataclasses look their module up there
spec.loader.exec_module(mutation_check)

TESTS = '''
import time
import pytest

def test_passes():
    assert 1 + 1 == 2

def test_fails_an_assert():
    assert [1, 2] == [1, 3]

def test_fails_through_pytest_raises():
    with pytest.raises(ValueError):
        pass

def test_breaks_with_a_type_error():
    len(3)

@pytest.fixture
def broken_fixture():
    raise RuntimeError("setup broke")

def test_with_a_broken_fixture(broken_fixture):
    assert True

@pytest.mark.parametrize("x", [1, 2])
def test_param(x):
    assert x == 1

@pytest.mark.skip(reason="not here")
def test_skipped():
    assert False

def test_sleeps():
    time.sleep(60)
'''


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("mc") / "repo"
    (root / "tests" / "sub").mkdir(parents=True)
    (root / "tests" / "sub" / "test_cases.py").write_text(TESTS)
    (root / "tests" / "test_unimportable.py").write_text("import no_such_module_here\n\ndef test_x():\n    pass\n")
    return root


def verdict_of(repo: Path, *named: str) -> tuple[str, str]:
    return mutation_check.run_tests(repo, named, timeout=120)


@pytest.mark.parametrize("named,kind,says", [
    (("tests/sub/test_cases.py::test_passes",), "PASSED", "1 named test(s) passed"),
    (("tests/sub/test_cases.py::test_fails_an_assert",), "CAUGHT", "assert [1, 2] == [1, 3]"),
    (("tests/sub/test_cases.py::test_fails_through_pytest_raises",), "CAUGHT", "DID NOT RAISE"),
    (("tests/sub/test_cases.py::test_breaks_with_a_type_error",), "ERROR", "TypeError"),
    (("tests/sub/test_cases.py::test_with_a_broken_fixture",), "ERROR", "setup broke"),
    (("tests/sub/test_cases.py::test_param",), "CAUGHT", "test_param[2]"),  # a name covers all its params
    (("tests/sub/test_cases.py::test_param[1]",), "PASSED", "1 named test(s) passed"),
    (("tests/sub/test_cases.py::test_skipped",), "NOT RUN", "skipped"),
    (("tests/test_unimportable.py",), "ERROR", "collection"),
])
def test_a_verdict_comes_from_the_report_not_the_exit_status(repo, named, kind, says):
    got, why = verdict_of(repo, *named)
    assert got == kind and says in why, (got, why)


def test_a_test_that_was_not_asked_for_does_not_count(repo):
    """A failing test beside the named one, in the same run, neither catches nor breaks anything."""
    report = repo.parent / "both.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
                    "tests/sub/test_cases.py::test_passes", "tests/sub/test_cases.py::test_fails_an_assert"],
                   cwd=repo, capture_output=True)
    assert mutation_check.verdict(report, ("tests/sub/test_cases.py::test_passes",))[0] == "PASSED"
    assert mutation_check.verdict(report, ("tests/sub/test_nowhere.py::test_x",))[0] == "NOT RUN"


def test_a_hang_is_a_timeout_and_leaves_nothing_running(repo):
    kind, why = mutation_check.run_tests(repo, ("tests/sub/test_cases.py::test_sleeps",), timeout=8)
    assert kind == "TIMEOUT", (kind, why)
    leftover = subprocess.run(["pgrep", "-f", "test_cases.py::test_sleeps"], capture_output=True, text=True)
    assert leftover.stdout.strip() == ""


def test_runs_that_disagree_are_flaky():
    assert mutation_check.judge([("CAUGHT", "a"), ("PASSED", "b")])[0] == "FLAKY"
    assert mutation_check.judge([("CAUGHT", "a"), ("CAUGHT", "b")]) == ("CAUGHT", "a")
    assert mutation_check.judge([("PASSED", "a"), ("PASSED", "a")])[0] == "MISSED"


def test_every_mutation_still_applies_to_the_code():
    """A mutation whose text the code no longer holds would silently test nothing."""
    for m in mutation_check.MUTATIONS:
        assert m.old in (ROOT / m.path).read_text(), m.what
        for node in m.tests:
            assert (ROOT / node.split("::")[0]).is_file(), (m.what, node)
