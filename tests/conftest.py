"""Test-wide setup: every Ray node, gloo group and server a test starts stays on loopback."""

from cluster.local_ray import use_loopback

use_loopback()
