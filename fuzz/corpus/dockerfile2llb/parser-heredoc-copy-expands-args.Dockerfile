FROM scratch
ARG NAME=world
COPY <<EOF /greet
hello $NAME
EOF
