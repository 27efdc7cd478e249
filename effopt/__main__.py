from effopt.cli import main

main()
