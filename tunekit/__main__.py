from tunekit.cli.app import main

main()
