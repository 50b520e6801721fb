"""Built-in datasets: `synthetic`, the "make the square red" toy task (examples and its reward)."""
