"""Test-wide setup: every Ray node, gloo group and server a test starts stays on loopback."""

from unisrec.runtime import use_loopback

use_loopback()
