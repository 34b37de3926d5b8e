from goldstone_cli.cli import main

main()
