"""Tests of rollout_fast.capture (a package so its test modules may share names with other rooms' tests)."""
