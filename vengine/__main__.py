from vengine.cli.main import main

raise SystemExit(main())
