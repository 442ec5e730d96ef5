"""Tests of rollout_fast.ops (a package so its test modules may share names with other rooms' tests)."""
