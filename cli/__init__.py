"""The `rsedge` command: the top of the host stack (trainer <- compress <- export <- cli)."""
