"""The statistics of MSE polynomial fits: layout, degree choice, the native kernel."""
