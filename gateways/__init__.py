"""voxrelay's front doors: thin translations between a wire protocol and the core."""
