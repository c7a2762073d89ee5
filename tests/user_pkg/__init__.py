"""A package written as a user of trgl_pipe would write it: networks and data by import path."""
