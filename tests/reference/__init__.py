"""Tests of rollout_fast.reference (a package so its test modules may share names with other rooms' tests)."""
