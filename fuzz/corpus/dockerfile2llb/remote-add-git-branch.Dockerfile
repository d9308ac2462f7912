FROM scratch
ADD {{GIT}}/repo.git#main /src
