from gelugemm_cli.app import main

main()
