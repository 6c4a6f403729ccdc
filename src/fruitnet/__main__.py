from fruitnet.cli import main

raise SystemExit(main())
