from gateway.cli import main

if __name__ == "__main__":  # not in the processes it spawns
    main()
