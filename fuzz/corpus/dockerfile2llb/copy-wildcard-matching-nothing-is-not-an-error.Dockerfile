FROM scratch
COPY package*.json optional.tx[t] /app/
