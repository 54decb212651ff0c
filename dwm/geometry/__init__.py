"""Pure geometry shared by the world's cameras and the model's layouts: projecting 3D segments
and boxes into pinhole cameras, and painting lines and polygons the way the reference draws."""
