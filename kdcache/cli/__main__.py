from kdcache.cli.app import main

main()
