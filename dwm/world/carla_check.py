"""`python -m dwm.world.carla_check` is kept as an alias of `python -m dwm.carla_check`, which
lives beside `dwm.run` because it composes a world with the conditions drawing."""

if __name__ == "__main__":
    import runpy

    runpy.run_module("dwm.carla_check", run_name="__main__", alter_sys=True)
