"""Runs Eclipse Paho's interoperability client tests (paho.mqtt.testing, interoperability/
client_test.py for MQTT 3.1.1 or client_test5.py for MQTT 5) against HOST:PORT and prints one
line per test: `RESULT name` (ok, FAIL, ERROR, skip, or TIMEOUT for a test that did not end within
TEST_TIMEOUT seconds: some of them wait forever for a packet that does not come).

The suites read their target from module globals that their own __main__ block sets from the
command line; this runner sets them itself, so that any port works. Each test runs in a process
of its own, so that a hung test is ended and the next one starts clean.

usage: python3 conformance.py SUITE_DIR client_test|client_test5 HOST PORT [TEST]
"""
import contextlib
import importlib
import io
import os
import subprocess
import sys
import unittest

TEST_TIMEOUT = int(os.environ.get("TEST_TIMEOUT", "30"))


def load(suite_dir, name, host, port):
    sys.path.insert(0, suite_dir)
    module = importlib.import_module(name)
    module.host, module.port = host, port
    prefix = "client_test5/" if name == "client_test5" else ""
    module.topic_prefix = prefix
    module.topics = [prefix + t for t in ("TopicA", "TopicA/B", "Topic/C", "TopicA/C", "/TopicA")]
    module.wildtopics = [prefix + t for t in ("TopicA/+", "+/C", "#", "/#", "/+", "+/+", "TopicA/#")]
    module.nosubscribe_topics = ("test/nosubscribe",)
    return module


def run_one(module, test_name):
    """Runs one test in this process and prints its result."""
    suite = unittest.defaultTestLoader.loadTestsFromName(test_name, module.Test)
    # The suites print their progress; it goes to stderr, the result alone to stdout.
    with contextlib.redirect_stdout(sys.stderr):
        result = unittest.TextTestRunner(stream=io.StringIO(), verbosity=0).run(suite)
    if result.failures:
        outcome = "FAIL"
    elif result.errors:
        outcome = "ERROR"
    elif result.skipped:
        outcome = "skip"
    else:
        outcome = "ok"
    print(outcome, test_name)


def main():
    suite_dir, name, host, port = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    module = load(suite_dir, name, host, port)
    if len(sys.argv) > 5:
        run_one(module, sys.argv[5])
        return
    names = unittest.defaultTestLoader.getTestCaseNames(module.Test)
    for test_name in sorted(names):
        try:
            done = subprocess.run(
                [sys.executable, __file__, *sys.argv[1:5], test_name],
                stdout=subprocess.PIPE,
                timeout=TEST_TIMEOUT,
                text=True,
            )
            line = done.stdout.strip().splitlines()
            print(line[-1] if line else f"ERROR {test_name}")
        except subprocess.TimeoutExpired:
            print("TIMEOUT", test_name)
        sys.stdout.flush()


if __name__ == "__main__":
    main()
