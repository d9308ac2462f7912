FROM busybox
RUN <<EOF
#!/bin/sh
echo shebang > /sb
EOF
