"""What the board is doing while it is measured: tegrastats, power, conditions, memory."""
